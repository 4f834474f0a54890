"""Argument checks shared by the public entry points.

Checks run at trace time on Python numbers and concrete arrays; values that
are traced (for example a step size under ``jax.vmap``) cannot be inspected
without a device round trip and are left to the runtime status in ``info``:
`is_positive` and `in_unit_interval` return the traced condition, which the
entry points turn into ``Status.INVALID_INPUT`` (`status.unless_invalid`).
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
  except Exception:
    return None


# Iteration counters are int32 arrays.
MAX_INT32 = 2**31 - 1


def check_positive_int(
  name: str, value: Any, maximum: int = MAX_INT32, why: str = "iteration counters are int32"
) -> int:
  """A Python int in [1, maximum] (``why`` explains the bound in the error)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
      f"`{name}` must be a positive Python int, got {value!r} of type {type(value).__name__}."
    )
  if value <= 0:
    raise ValueError(f"`{name}` must be positive, got {value}.")
  if value > maximum:
    raise ValueError(f"`{name}` must be at most {maximum} ({why}), got {value}.")
  return int(value)


def is_positive(value: Any) -> jax.Array:
  """``all(value > 0)`` as a (possibly traced) bool; False for NaN."""
  return jnp.all(jnp.asarray(value) > 0)


def in_unit_interval(value: Any) -> jax.Array:
  """``all(0 <= value <= 1)`` as a (possibly traced) bool; False for NaN."""
  value = jnp.asarray(value)
  return jnp.all((value >= 0) & (value <= 1))


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
    raise ValueError(
      f"`{name}` must be finite; it has {int(np.sum(~np.isfinite(concrete)))} "
      "NaN or infinite entries."
    )


def check_in_unit_interval(name: str, value: Any) -> None:
  concrete = concrete_value(value)
  if concrete is None:
    return
  if not np.all((concrete >= 0) & (concrete <= 1)):
    raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")


def check_scalar_output(
  name: str,
  fn,
  *args,
  call: str = "on the initial point (x, `y0`); do `x` and `y0` "
  "have the structure and shapes it expects?",
) -> jax.ShapeDtypeStruct:
  """Evaluates ``fn(*args)`` abstractly and checks that it is a real scalar
  (``call`` says how ``name`` was called, for the error message)."""
  try:
    out = jax.eval_shape(fn, *args)
  except Exception as err:  # re-raised with the argument's name
    raise TypeError(f"`{name}` failed when called {call} {err}") from err
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"`{name}` must return a scalar, got an output of shape {shape}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"`{name}` must return a floating-point scalar, got dtype {out.dtype}.")
  return out


def check_prng_key(name: str, key: Any) -> None:
  """A JAX PRNG key: a typed key (`jax.random.key`) or a raw uint32 key
  (`jax.random.PRNGKey`, shape (..., 2) for the default implementation)."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return
  if dtype is not None and dtype == jnp.uint32 and jnp.ndim(key) >= 1:
    return
  raise TypeError(
    f"`{name}` must be a JAX PRNG key (`jax.random.key(0)` or "
    f"`jax.random.PRNGKey(0)`), got {key!r} of type {type(key).__name__}."
  )


def check_same_structure(name: str, reference, candidate, what: str) -> None:
  """Checks that ``candidate`` has the tree structure, shapes and dtypes of
  ``reference`` (``what`` describes where ``candidate`` came from)."""
  ref_def = jax.tree_util.tree_structure(reference)
  cand_def = jax.tree_util.tree_structure(candidate)
  if ref_def != cand_def:  # type: ignore[operator]
    raise ValueError(f"`{name}`: {what} has tree structure {cand_def}, expected {ref_def}.")
  for ref, cand in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(candidate)):
    if jnp.shape(ref) != jnp.shape(cand):
      raise ValueError(
        f"`{name}`: {what} has a leaf of shape {jnp.shape(cand)}, expected {jnp.shape(ref)}."
      )


def check_keywords(where: str, kwargs, accepted) -> None:
  """Raises a TypeError naming the unknown keyword arguments of ``where``."""
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(f"unknown keyword argument(s) {unknown}; `{where}` takes {sorted(accepted)}.")
