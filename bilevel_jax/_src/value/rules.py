"""Integration rules on the unit cube [0, 1]^m for the entropic value function.

* Composite tensor Gauss-Legendre: each axis is cut into ``panels`` equal
  panels with ``order`` Gauss-Legendre nodes each, and the m-dimensional rule
  is the tensor product, (order * panels)^m nodes. Exact for polynomials of
  degree 2 order - 1 per panel and axis; used for m <= 3.
* Randomized quasi-Monte Carlo: the Halton sequence (radical inverses in the
  first m primes, the first ``skip`` points dropped), randomized by R
  independent uniform shifts modulo 1 (Cranley-Patterson rotation) drawn from
  a JAX key. Each shifted set is an unbiased estimate of the integral, so the
  spread of the R estimates gives an error estimate. Used for m > 3. We chose
  Halton over Sobol because it needs no table of direction numbers; for
  m > ~10 unscrambled Halton degrades, which the error estimate then shows.

Nodes are fixed arrays computed with NumPy when the program is traced (they
depend only on static sizes); the random shift is a JAX operation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_PRIMES = (
  2,
  3,
  5,
  7,
  11,
  13,
  17,
  19,
  23,
  29,
  31,
  37,
  41,
  43,
  47,
  53,
  59,
  61,
  67,
  71,
  73,
  79,
  83,
  89,
  97,
  101,
  103,
  107,
  109,
  113,
  127,
  131,
  137,
  139,
  149,
  151,
)


@functools.lru_cache(maxsize=64)
def gauss_legendre(orders: tuple, panels: tuple):
  """Composite tensor Gauss-Legendre rule on [0, 1]^m, m = len(orders).

  Axis j has ``panels[j]`` equal panels with ``orders[j]`` nodes each.
  Returns ``(nodes, weights)``: NumPy arrays of shapes (N, m) and (N,) with
  N = prod_j orders[j] panels[j] and weights summing to 1.
  """
  axes_nodes, axes_weights = [], []
  for order, count in zip(orders, panels):
    t, w = np.polynomial.legendre.leggauss(order)  # on [-1, 1], sum w = 2
    edges = np.arange(count, dtype=np.float64) / count
    axes_nodes.append((edges[:, None] + (t[None, :] + 1.0) / (2.0 * count)).ravel())
    axes_weights.append(np.tile(w / (2.0 * count), count))
  grids = np.meshgrid(*axes_nodes, indexing="ij")
  nodes = np.stack([g.ravel() for g in grids], axis=-1)
  wgrids = np.meshgrid(*axes_weights, indexing="ij")
  weights = np.prod(np.stack([g.ravel() for g in wgrids], axis=-1), axis=-1)
  return nodes, weights


@functools.lru_cache(maxsize=64)
def halton(m: int, n: int, skip: int = 1):
  """First ``n`` Halton points in [0, 1)^m after dropping ``skip`` points."""
  if m > len(_PRIMES):
    raise ValueError(f"Halton points are implemented up to m = {len(_PRIMES)}, got m = {m}.")
  idx = np.arange(skip, skip + n, dtype=np.int64)
  out = np.zeros((n, m))
  for j, base in enumerate(_PRIMES[:m]):
    k = idx.copy()
    f = 1.0
    value = np.zeros(n)
    while np.any(k > 0):
      f /= base
      value += f * (k % base)
      k //= base
    out[:, j] = value
  return out


def shifted_halton(key, m: int, n: int, randomizations: int, dtype):
  """R randomly shifted copies of n Halton points: shape (R, n, m) in [0, 1)."""
  base = jnp.asarray(halton(m, n), dtype)
  shifts = jax.random.uniform(key, (randomizations, 1, m), dtype)
  return jnp.mod(base[None] + shifts, 1.0)
