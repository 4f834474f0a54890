"""Argument checks, closure handling and inner-status helpers shared by the
value functions.

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

The lower objective is called ``g(x, y)``, or ``g(x, y, mu)`` with
``pass_mu=True`` so that a smoothing family g_mu (Definition 2.5) can depend on
the same mu that is vmapped or differentiated over.  Status codes are those of
`bilevel_jax.Status` (`bilevel_jax._src.status`).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bilevel_jax._src import implicit_diff
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import validation
from bilevel_jax._src import variables


def lower_fn(g: Callable, pass_mu: bool, name: str = "g") -> Callable:
  """Returns ``g3(x, y, mu)`` whatever the user's signature."""
  if not callable(g):
    raise TypeError(f"`{name}` must be callable, got {type(g).__name__}.")
  if pass_mu:
    return g
  return lambda x, y, mu: g(x, y)


def check_mu(mu) -> None:
  """mu > 0 when concrete (a traced mu is checked at run time via status)."""
  validation.check_positive("mu", mu)
  concrete = validation.concrete_value(mu)
  if concrete is not None and concrete.ndim != 0:
    raise ValueError(
      f"`mu` must be a scalar (vmap over it for several), got shape {concrete.shape}."
    )


def check_variable(name: str, tree) -> None:
  """`variables.check`, and no integer, boolean or key leaves: the value
  functions ravel, project and optimize every leaf of x and y."""
  variables.check(name, tree)
  if variables.has_rest(tree):
    kinds = sorted(
      {
        str(getattr(leaf, "dtype", type(leaf).__name__))
        for leaf in jax.tree_util.tree_leaves(tree)
        if not variables.is_differentiable(leaf)
      }
    )
    raise TypeError(
      f"`{name}` must have only floating-point leaves, got leaves of kind "
      f"{kinds}; pass the floating-point part and close over the rest."
    )


def check_g(g3: Callable, x, y, mu) -> None:
  check_variable("x", x)
  validation.check_scalar_output("g", g3, x, y, mu)


def convert(g3: Callable, x, y, mu):
  """Closure-converts ``g3`` (`implicit_diff.closure_convert`) so that arrays
  it closes over become explicit inputs of the custom derivative rules (their
  cotangents are then exact too). Returns ``(gp, consts)`` with
  ``gp((x, consts), y, mu) = g3(x, y, mu)``.
  """
  converted, consts = implicit_diff.closure_convert(g3, x, y, mu)

  def gp(p, yy, m):
    xx, cs = p
    return converted(xx, yy, m, *cs)

  return gp, consts


def floating_dtype(x) -> Any:
  return variables.dtype_of(x)


def as_scalar(mu, dtype):
  return jnp.asarray(mu, dtype=dtype)


def value_of(out):
  """A value function's output: a scalar or a solution with ``.value``."""
  return out.value if hasattr(out, "value") else out


def status_of(out):
  """``info.status`` of a value function's solution; SUCCESS for a bare value."""
  info = getattr(out, "info", None)
  status = getattr(info, "status", None)
  if status is None:
    return jnp.asarray(status_lib.SUCCESS, jnp.int32)
  return jnp.asarray(status, jnp.int32)
