"""Euclidean projections onto simple sets, acting on pytrees.

Used for the upper-level constraint x in X (Example 1 has X = [-100, 100])
and, through `prox.from_projection`, as proximal maps of indicator functions.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation

Projection = Callable[[Any], Any]
"""A projection ``P(tree) -> tree``: the Euclidean projection of a pytree onto
a closed convex set, returning a pytree of the same structure, shapes and
dtypes. `bilevel_jax.upper.optimize` (``projection=``), `bilevel_jax.value`
(``projection=``, ``projection_x=``, ``projection_y=``) and
`bilevel_jax.prox.from_projection` take any such callable.
"""


def _is_single_bound(bound) -> bool:
  """One number or array, applied (broadcast) to every leaf."""
  return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(bound))


def _broadcast_like(bound, tree, name: str):
  """A bound is one number or array (applied to every leaf) or a pytree like ``tree``."""
  if _is_single_bound(bound):
    return jax.tree_util.tree_map(lambda _: bound, tree)
  bound_def = jax.tree_util.tree_structure(bound)
  tree_def = jax.tree_util.tree_structure(tree)
  if bound_def != tree_def:  # type: ignore[operator]  # PyTreeDef stubs lack __ne__
    raise ValueError(
      f"`{name}` must be a number, an array or a pytree with the structure of the projected "
      f"value: got {bound_def} for a value with structure {tree_def}."
    )
  return bound


def box(lower, upper) -> Projection:
  """P(y) = clip(y, lower, upper); bounds are scalars or pytrees like y.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import projections
    >>> projections.box(-1.0, 1.0)(jnp.array([-2.0, 0.5, 3.0])).tolist()
    [-1.0, 0.5, 1.0]
    >>> per_leaf = projections.box({"a": 0.0, "b": -1.0}, {"a": 1.0, "b": 2.0})
    >>> {k: float(v) for k, v in per_leaf({"a": 3.0, "b": -3.0}).items()}
    {'a': 1.0, 'b': -1.0}
  """
  _check_ordered(lower, upper)

  def project(tree):
    return jax.tree_util.tree_map(
      jnp.clip, tree, _broadcast_like(lower, tree, "lower"), _broadcast_like(upper, tree, "upper")
    )

  return project


def _check_ordered(lower, upper) -> None:
  """ValueError when concrete bounds have some ``lower > upper``.

  A single (number or array) bound is compared with every leaf of the other; two pytree bounds
  must share one structure. Traced bounds are not checked (values unknown).
  """
  if _is_single_bound(lower) and not _is_single_bound(upper):
    lower = jax.tree_util.tree_map(lambda _: lower, upper)
  elif _is_single_bound(upper) and not _is_single_bound(lower):
    upper = jax.tree_util.tree_map(lambda _: upper, lower)
  lo_def = jax.tree_util.tree_structure(lower)
  hi_def = jax.tree_util.tree_structure(upper)
  if lo_def != hi_def:  # type: ignore[operator]  # PyTreeDef stubs lack __ne__
    raise ValueError(
      f"`lower` and `upper` must be numbers, arrays or pytrees of one structure: got {lo_def} and {hi_def}."
    )
  for lo_leaf, hi_leaf in zip(jax.tree_util.tree_leaves(lower), jax.tree_util.tree_leaves(upper)):
    lo, hi = validation.concrete_value(lo_leaf), validation.concrete_value(hi_leaf)
    if lo is not None and hi is not None and (lo > hi).any():
      raise ValueError(f"`lower` must be <= `upper`, got {lower} and {upper}.")


def nonnegative() -> Projection:
  """P(y) = max(y, 0) leaf by leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import projections
    >>> projections.nonnegative()({"w": jnp.array([-1.0, 2.0])})["w"].tolist()
    [0.0, 2.0]
  """

  def project(tree):
    return jax.tree_util.tree_map(lambda v: jnp.maximum(v, 0), tree)

  return project


def l2_ball(radius: float) -> Projection:
  """P(y) = y * min(1, radius / ||y||), with ||.|| over the whole pytree.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import projections
    >>> [round(v, 4) for v in projections.l2_ball(1.0)(jnp.array([3.0, 4.0])).tolist()]
    [0.6, 0.8]
    >>> [round(v, 4) for v in projections.l2_ball(1.0)(jnp.array([0.3, 0.4])).tolist()]
    [0.3, 0.4]
  """
  validation.check_positive("radius", radius)

  def project(tree):
    norm = tree_ops.tree_norm(tree)
    scale = jnp.minimum(1.0, radius / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))
    return jax.tree_util.tree_map(lambda v: (scale * v).astype(v.dtype), tree)

  return project
