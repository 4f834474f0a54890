"""Status codes, argument checks and closure handling shared by the value
functions.

The lower objective is called ``g(x, y)``, or ``g(x, y, mu)`` with
``pass_mu=True`` so that a smoothing family g_mu (Definition 2.5) can depend on
the same mu that is vmapped or differentiated over.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src import validation

SUCCESS = 0
NONFINITE = 1
MAX_STEPS = 2
INACCURATE = 3
STATUS_MESSAGES = {
    SUCCESS: "success",
    NONFINITE: "non-finite value or gradient",
    MAX_STEPS: "max_steps reached before the tolerance",
    INACCURATE: "integration-error estimate above tol",
}


def lower_fn(g: Callable, pass_mu: bool) -> Callable:
  """Returns ``g3(x, y, mu)`` whatever the user's signature."""
  if not callable(g):
    raise TypeError(f"`g` must be callable, got {type(g).__name__}.")
  if pass_mu:
    return g
  return lambda x, y, mu: g(x, y)


def check_mu(mu) -> None:
  """mu > 0 when concrete (a traced mu is checked at run time via status)."""
  validation.check_positive("mu", mu)
  concrete = validation.concrete_value(mu)
  if concrete is not None and concrete.ndim != 0:
    raise ValueError(f"`mu` must be a scalar (vmap over it for several), got "
                     f"shape {concrete.shape}.")


def check_g(g3: Callable, x, y, mu) -> None:
  validation.check_float_leaves("x", x)
  validation.check_scalar_output("g", g3, x, y, mu)


def convert(g3: Callable, x, y, mu):
  """Closure-converts ``g3`` so that arrays it closes over become explicit
  inputs of the custom derivative rules (their cotangents are then exact
  too). Returns ``(gp, consts)`` with ``gp((x, consts), y, mu) = g3(x, y, mu)``.
  """
  converted, consts = jax.closure_convert(g3, x, y, mu)
  consts = tuple(consts)

  def gp(p, yy, m):
    xx, cs = p
    return converted(xx, yy, m, *cs)

  return gp, consts


def floating_dtype(x) -> Any:
  leaves = jax.tree_util.tree_leaves(x)
  return jnp.result_type(*leaves)


def as_scalar(mu, dtype):
  return jnp.asarray(mu, dtype=dtype)


def value_of(out):
  """A value function's output: a scalar or a solution with ``.value``."""
  return out.value if hasattr(out, "value") else out


def status_message(status) -> str:
  return STATUS_MESSAGES.get(int(np.asarray(status)), "unknown")
