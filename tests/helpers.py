"""Shared test utilities."""

import jax
import jax.numpy as jnp
import numpy as np


def finite_difference_grad(fn, x, eps=1e-6):
  """Central differences of a scalar function of a flat float64 array
  (``fn`` is jitted: one compilation for the 2 n evaluations)."""
  fn = jax.jit(fn)
  x = np.asarray(x, dtype=np.float64)
  grad = np.zeros_like(x)
  for i in range(x.size):
    e = np.zeros_like(x)
    e.flat[i] = eps
    grad.flat[i] = (float(fn(jnp.asarray(x + e))) - float(fn(jnp.asarray(x - e)))) / (2 * eps)
  return grad


def tree_allclose(a, b, **kw):
  return all(
    np.allclose(x, y, **kw)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )
