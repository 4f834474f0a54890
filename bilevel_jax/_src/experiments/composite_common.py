"""Pieces shared by the Section 6 experiments of Solla & Royset."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from bilevel_jax._src.composite import solver
from bilevel_jax._src.problems import regression


def retrain(data, lower_fn, x, reg):
  """The model refit at x with alpha = beta = reg (the papers' 'retraining'),
  and its validation and test errors."""
  low = lower_fn(data)
  sol = solver.solve(low.g, low.G, low.h, x, y0=low.y0, alpha=reg, beta=reg)
  coef = low.to_model(sol.y)
  return (regression.mse(data.a_val, data.b_val, coef),
          regression.mse(data.a_test, data.b_test, coef), sol.info.status)


def hyper_objective(low, upper_fn, warm_start: bool = True):
  """f(x, Y_{alpha,beta}(x)) for gradient sampling, and its first state.

  With ``warm_start`` (default) the function carries the lower-level solution
  as its state: ``fun(x, alpha, beta, y) -> (upper_fn(y), y_new)``, each solve
  started from the previous one with method="warm" (Newton first, the
  interior point only where Newton stalls); pass the returned state as
  ``state0``.  Without, ``fun(x, alpha, beta)`` solves from ``low.y0`` with the
  interior point method each time, and the state is None.
  """
  if not warm_start:
    def cold(x, alpha, beta):
      sol = solver.solve(low.g, low.G, low.h, x, y0=low.y0, alpha=alpha, beta=beta)
      return upper_fn(low.to_model(sol.y))
    return cold, None

  def warm(x, alpha, beta, y):
    sol = solver.solve(low.g, low.G, low.h, x, y0=y, alpha=alpha, beta=beta, method="warm")
    return upper_fn(low.to_model(sol.y)), sol.y
  return warm, low.y0


def timed(fn, *args):
  """(result, compile seconds, run seconds) of a jitted fn on args."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, compile_s, time.perf_counter() - start


BATCHING = ("map", "vmap")


def batched(fn, batching: str):
  """fn(data, key) over stacked instances in one jitted call: `jax.vmap`
  (lanes in lockstep: every lane runs until the slowest instance stops) or
  `jax.lax.map` (one instance after another inside the same computation)."""
  if batching == "vmap":
    return jax.vmap(fn)
  return lambda data, keys: jax.lax.map(lambda args: fn(*args), (data, keys))


def mean(values) -> float:
  return float(jnp.mean(jnp.asarray(values)))
