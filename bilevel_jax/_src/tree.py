"""Small pytree arithmetic used by the solvers (no dependency beyond JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_axpy(a, x, y):
  """Returns ``a * x + y`` leaf by leaf."""
  return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


def tree_sub(x, y):
  return jax.tree_util.tree_map(jnp.subtract, x, y)


def tree_scale(a, x):
  return jax.tree_util.tree_map(lambda xi: a * xi, x)


def tree_norm(x):
  """Euclidean norm of a pytree viewed as one flat vector."""
  leaves = jax.tree_util.tree_leaves(x)
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def tree_all_finite(x):
  """True when every floating-point leaf of ``x`` is finite (True for none)."""
  leaves = [
    leaf
    for leaf in jax.tree_util.tree_leaves(x)
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [jnp.array(True)]))


def tree_cast_like(x, like):
  """Casts each leaf of ``x`` to the dtype of the matching leaf of ``like``."""
  return jax.tree_util.tree_map(lambda xi, li: jnp.asarray(xi, jnp.result_type(li)), x, like)
