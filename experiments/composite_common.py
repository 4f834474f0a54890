"""Pieces shared by the Section 6 experiments of Solla & Royset."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import config
from experiments.common import spread  # noqa: F401  (the Section 6 experiments' cc.spread)
from bilevel_jax._src import status as status_lib
from bilevel_jax._src.composite import solver
from bilevel_jax._src.problems import regression


def problem_schema(dim: int, instances: bool = True) -> dict:
  """The [problem] fields of the Section 6 data (`regression.make_instances`)."""
  F = config.Field
  fields = {"instances": F("int", 20, config.positive)} if instances else {}
  return {
    **fields,
    "seed": F("int", 0),
    "dim": F("int", dim, config.positive),
    "n_train": F("int", 100, config.positive),
    "n_val": F("int", 100, config.positive),
    "n_test": F("int", 300, config.positive),
  }


def warm_start_schema() -> dict:
  """The [algorithm] fields that choose warm lower solves and how the N_sam
  sampled hypergradients are batched (Algorithms 1 and 2 alike)."""
  from bilevel_jax._src import gradient_sampling as gs

  F = config.Field
  return {
    "warm_start": F(
      "bool",
      True,
      doc="lower-level solves start from the previous solution (composite.solve method='warm')",
    ),
    "sample_batching": F(
      "str",
      "map",
      config.one_of(*gs.BATCHINGS),
      "the N_sam sampled hypergradients: lax.map or vmap",
    ),
  }


def retrain(data, lower_fn, x, reg):
  """The model refit at x with alpha = beta = reg (the papers' 'retraining'),
  and its validation and test errors."""
  low = lower_fn(data)
  sol = solver.solve(low.g, low.G, low.h, x, low.y0, alpha=reg, beta=reg)
  coef = low.to_model(sol.y)
  return (
    regression.mse(data.a_val, data.b_val, coef),
    regression.mse(data.a_test, data.b_test, coef),
    sol.info.status,
  )


class LowerStatus(NamedTuple):
  status: Any


class WarmState(NamedTuple):
  """The state a warm-started hyper-objective carries: the lower solution y
  and, as ``info.status``, the status of the solve that produced it (read by
  gradient sampling).  The rest of the solution's info is left out, so that
  its computation is dropped from the compiled loop."""

  y: Any
  info: LowerStatus


def hyper_objective(low, upper_fn, warm_start: bool = True):
  """f(x, Y_{alpha,beta}(x)) for gradient sampling, and its first state.

  With ``warm_start`` (default) the function carries the lower-level solution
  as its state: ``fun(x, alpha, beta, state) -> (upper_fn(y), state_new)``, a
  `WarmState`, each solve started from the previous ``state.y`` with
  method="warm" (Newton first, the interior point only where Newton
  stalls); pass the returned state as ``state0``.  Without, ``fun(x, alpha,
  beta) -> (upper_fn(y), solution)`` solves from ``low.y0`` with the
  interior point method each time, and the state is None.  Either way
  gradient sampling reads the lower status off ``.info.status``.
  """
  if not warm_start:

    def cold(x, alpha, beta):
      sol = solver.solve(low.g, low.G, low.h, x, low.y0, alpha=alpha, beta=beta)
      return upper_fn(low.to_model(sol.y)), sol

    return cold, None

  def warm(x, alpha, beta, state):
    sol = solver.solve(low.g, low.G, low.h, x, state.y, alpha=alpha, beta=beta, method="warm")
    return upper_fn(low.to_model(sol.y)), WarmState(sol.y, LowerStatus(sol.info.status))

  return warm, WarmState(low.y0, LowerStatus(jnp.asarray(status_lib.SUCCESS, jnp.int32)))


def met_stopping_rule(status):
  """The run met its stopping rule: SUCCESS, or INNER_FAILED (met, with a
  failed inner solve on the way)."""
  return (status == status_lib.SUCCESS) | (status == status_lib.INNER_FAILED)


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
  """The mean as a Python float (integer counts averaged in the default
  float dtype, float64 under x64, not float32)."""
  values = jnp.asarray(values)
  if not jnp.issubdtype(values.dtype, jnp.floating):
    values = values.astype(float)
  return float(jnp.mean(values))


def ratio_of_means(num, den) -> dict:
  """mean(num) / mean(den) over paired instances, with its standard error
  by the delta method (the covariance of the pairs included)."""
  a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
  n = a.size
  ma, mb = a.mean(), b.mean()
  r = ma / mb
  if n < 2:
    return {"ratio": float(r), "se": float("nan"), "n": int(n)}
  cov = np.cov(a, b, ddof=1)
  var = r**2 * (cov[0, 0] / ma**2 + cov[1, 1] / mb**2 - 2 * cov[0, 1] / (ma * mb)) / n
  return {"ratio": float(r), "se": float(np.sqrt(max(var, 0.0))), "n": int(n)}
