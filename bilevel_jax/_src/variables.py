"""Variables x and y as any pytree: arrays, Equinox modules, Flax NNX state.

A variable is split into its *differentiable* part (floating-point array
leaves, and Python floats) and the rest (integer and boolean arrays, PRNG
keys, activation functions, ...), as ``eqx.partition(tree,
eqx.is_inexact_array)`` does.  Solvers iterate on, differentiate and ravel
the differentiable part only; the rest is carried along untouched and
recombined before each call of the user's objective.  The two parts have the
structure of the variable with ``None`` where a leaf belongs to the other.

  * Equinox: pass the module itself (``y0=mlp``); its activation functions
    and static fields are carried along.
  * Flax NNX: pass the state, ``graphdef, state = nnx.split(model)``, and
    merge inside the objective (``nnx.merge(graphdef, y)``); RNG keys and
    counters are carried along (not advanced between lower steps).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_differentiable(leaf) -> bool:
  """A floating-point array (JAX or NumPy) or a Python float."""
  if isinstance(leaf, (bool, np.bool_)):
    return False
  if isinstance(leaf, numbers.Real) and not isinstance(leaf, numbers.Integral):
    return True
  if isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or isinstance(leaf, jax.core.Tracer):
    dtype = getattr(leaf, "dtype", None)
    try:
      return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
    except TypeError:  # extended dtypes (PRNG keys)
      return False
  return False


def is_array_like(leaf) -> bool:
  """An array (JAX, NumPy, a tracer) or a Python number: what jax.jit takes as
  an argument; an Equinox module's functions are not."""
  return isinstance(
    leaf, (jax.Array, np.ndarray, np.generic, jax.core.Tracer, numbers.Number)
  ) and not isinstance(leaf, str)


def arrays_as_jax(tree):
  """``tree`` with its array-like leaves as JAX arrays, other leaves as they are."""
  return jax.tree_util.tree_map(lambda v: jnp.asarray(v) if is_array_like(v) else v, tree)


def partition(tree):
  """``(differentiable, rest)``: two trees like ``tree`` with ``None`` holes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  mask = [is_differentiable(leaf) for leaf in leaves]
  dynamic = treedef.unflatten([leaf if m else None for leaf, m in zip(leaves, mask)])
  static = treedef.unflatten([None if m else leaf for leaf, m in zip(leaves, mask)])
  return dynamic, static


def combine(dynamic, static):
  """Inverse of `partition`: fills the holes of ``dynamic`` from ``static``."""
  is_none = lambda v: v is None
  dyn_leaves, treedef = jax.tree_util.tree_flatten(dynamic, is_leaf=is_none)
  stat_leaves = jax.tree_util.tree_leaves(static, is_leaf=is_none)
  return treedef.unflatten([s if d is None else d for d, s in zip(dyn_leaves, stat_leaves)])


def has_rest(tree) -> bool:
  """True when ``tree`` has leaves that are not differentiable."""
  return not all(is_differentiable(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def check(name: str, tree) -> None:
  """Raises a TypeError naming ``name`` when ``tree`` has no floating-point
  leaf to optimize over."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"`{name}` has no array leaves.")
  if not any(is_differentiable(leaf) for leaf in leaves):
    kinds = sorted(
      {type(leaf).__name__ if not hasattr(leaf, "dtype") else str(leaf.dtype) for leaf in leaves}
    )
    raise TypeError(
      f"`{name}` must have floating-point leaves (the variables to "
      f"optimize), got only leaves of kind {kinds}. Integer, boolean and "
      f"key leaves are carried along but not optimized; for a Flax NNX "
      f"model pass the state of `graphdef, state = nnx.split(model)`."
    )


def dtype_of(tree) -> Any:
  """The common floating dtype of the differentiable leaves."""
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if is_differentiable(leaf)]
  return jnp.result_type(*leaves)
