"""Argument checks shared by the public entry points.

Checks run at trace time on Python numbers and concrete arrays; values that
are traced (for example a step size under ``jax.vmap``) cannot be inspected
without a device round trip and are left to the runtime status in ``info``.
"""
from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> np.ndarray | None:
  """Returns ``value`` as a NumPy array when it is known at trace time."""
  if isinstance(value, numbers.Number):
    return np.asarray(value)
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except Exception:  # noqa: BLE001 - anything that is not concrete
    return None


def check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"`{name}` must be a positive Python int, got {value!r} "
                    f"of type {type(value).__name__}.")
  if value <= 0:
    raise ValueError(f"`{name}` must be positive, got {value}.")
  return int(value)


def check_one_of(name: str, value: Any, choices) -> None:
  """Raises a ValueError naming ``name`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_positive(name: str, value: Any) -> None:
  """Raises if a concrete ``value`` has an entry that is not > 0 (or is NaN)."""
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.issubdtype(concrete.dtype, np.number):
    raise TypeError(f"`{name}` must be a number, got {value!r}.")
  if not np.all(concrete > 0):
    raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def check_finite(name: str, value: Any) -> None:
  """Raises a ValueError naming ``name`` if a concrete ``value`` has a NaN or
  infinite entry (traced values are left to the solver's status)."""
  concrete = concrete_value(value)
  if concrete is None or not np.issubdtype(concrete.dtype, np.number):
    return
  if not np.all(np.isfinite(concrete)):
    raise ValueError(f"`{name}` must be finite; it has {int(np.sum(~np.isfinite(concrete)))} "
                     "NaN or infinite entries.")


def check_in_unit_interval(name: str, value: Any) -> None:
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.all((concrete >= 0) & (concrete <= 1)):
    raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")


def check_scalar_output(name: str, fn, *args) -> jax.ShapeDtypeStruct:
  """Evaluates ``fn(*args)`` abstractly and checks that it is a real scalar."""
  try:
    out = jax.eval_shape(fn, *args)
  except Exception as err:  # re-raised with the argument's name
    raise TypeError(f"`{name}` failed when called on the initial point (x, `y0`); do "
                    f"`x` and `y0` have the structure and shapes `{name}` expects? "
                    f"{err}") from err
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"`{name}` must return a scalar, got an output of shape "
                     f"{shape}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"`{name}` must return a floating-point scalar, got dtype "
                    f"{out.dtype}.")
  return out


def check_same_structure(name: str, reference, candidate, what: str) -> None:
  """Checks that ``candidate`` has the tree structure, shapes and dtypes of
  ``reference`` (``what`` describes where ``candidate`` came from)."""
  ref_def = jax.tree_util.tree_structure(reference)
  cand_def = jax.tree_util.tree_structure(candidate)
  if ref_def != cand_def:
    raise ValueError(f"`{name}`: {what} has tree structure {cand_def}, "
                     f"expected {ref_def}.")
  for ref, cand in zip(jax.tree_util.tree_leaves(reference),
                       jax.tree_util.tree_leaves(candidate)):
    if jnp.shape(ref) != jnp.shape(cand):
      raise ValueError(f"`{name}`: {what} has a leaf of shape "
                       f"{jnp.shape(cand)}, expected {jnp.shape(ref)}.")


def check_keywords(where: str, kwargs, accepted) -> None:
  """Raises a TypeError naming the unknown keyword arguments of ``where``."""
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(f"unknown keyword argument(s) {unknown}; `{where}` takes "
                    f"{sorted(accepted)}.")
