"""Integration rules on the unit cube [0, 1]^m and the unit ball for the entropic value function.

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
* The Euclidean ball B_r(0) (Y_mu of the footnote to Theorem 4.13): a
  Gauss-Legendre rule in polar (m = 2) or spherical (m = 3) coordinates, or
  shifted Halton points in m + 1 dimensions mapped uniformly into the ball
  (`ball_from_cube`) for m > 3.

Nodes are fixed arrays computed with NumPy when the program is traced (they
depend only on static sizes); the random shift is a JAX operation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.special
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


def log_ball_volume(m: int, log_r):
  """ln vol(B_r(0)) in R^m = (m/2) ln pi - ln Gamma(m/2 + 1) + m ln r."""
  return 0.5 * m * math.log(math.pi) - math.lgamma(0.5 * m + 1.0) + m * log_r


def ball_gauss_legendre(orders: tuple, panels: tuple):
  """Composite Gauss-Legendre rule on the unit ball of R^m, m = len(orders) <= 3,
  in polar (m = 2) or spherical (m = 3) coordinates.

  The tensor rule of `gauss_legendre` on [0, 1]^m is mapped by
  s -> rho = s_0 (radius), m = 2: theta = 2 pi s_1, y = rho (cos theta, sin theta),
  dy = 2 pi rho ds; m = 3: t = 2 s_1 - 1 (the cosine of the polar angle),
  phi = 2 pi s_2, y = rho (sqrt(1 - t^2) cos phi, sqrt(1 - t^2) sin phi, t),
  dy = 4 pi rho^2 ds; m = 1 is the interval [-1, 1] (dy = 2 ds). Each
  coordinate integrand is smooth (polynomial in rho, trigonometric in the
  angles), so the rule converges like the tensor rule; no indicator of the
  ball is folded into a box rule. Axis 0 of ``orders``/``panels`` is the
  radius. Returns NumPy ``(nodes (N, m), weights (N,))``; the weights sum to
  vol(B_1) up to the rule's error in rho^{m-1} (exact when 2 order - 1 >= m - 1).
  """
  m = len(orders)
  if m > 3:
    raise ValueError(f"the Gauss-Legendre ball rule is for m <= 3, got m = {m}.")
  s, w = gauss_legendre(orders, panels)
  if m == 1:
    return 2.0 * s - 1.0, 2.0 * w
  rho = s[:, 0]
  if m == 2:
    theta = 2.0 * np.pi * s[:, 1]
    nodes = rho[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    return nodes, w * 2.0 * np.pi * rho
  t = 2.0 * s[:, 1] - 1.0
  phi = 2.0 * np.pi * s[:, 2]
  c = np.sqrt(1.0 - t * t)
  nodes = rho[:, None] * np.stack([c * np.cos(phi), c * np.sin(phi), t], axis=-1)
  return nodes, w * 4.0 * np.pi * rho * rho


def ball_from_cube(u):
  """Maps points u in [0, 1)^{m+1} (shape (..., m+1)) to the unit ball of R^m,
  uniform to uniform: direction z / ||z|| with z_j = Phi^{-1}(u_j) (a standard
  normal vector, so the direction is uniform on the sphere), radius
  u_m^{1/m}. The map preserves the uniform measure, so randomly shifted
  QMC points on the cube stay unbiased for the mean over the ball."""
  m = u.shape[-1] - 1
  tiny = jnp.finfo(u.dtype).eps
  z = jax.scipy.special.ndtri(jnp.clip(u[..., :m], tiny, 1.0 - tiny))
  direction = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  return u[..., m:] ** (1.0 / m) * direction
