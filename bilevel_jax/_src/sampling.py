"""Random points on the unit sphere and in a Euclidean ball (one sampler).

A direction uniform on the sphere S^{n-1} is a standard normal vector divided
by its norm; a point uniform in the ball B(c, r) is c + r U^{1/n} u with u on
the sphere and U uniform on [0, 1] (the radius has density n s^{n-1} / r^n).
Used by the gradient-sampling methods (points around x) and by
`bilevel_jax.value.consistency_check` (directions around x_bar).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sphere(key, count: int, n: int, dtype):
  """``count`` directions uniform on the unit sphere of R^n: shape (count, n)."""
  u = jax.random.normal(key, (count, n), dtype)
  return u / jnp.linalg.norm(u, axis=1, keepdims=True)


def ball(key, center, radius, count: int):
  """``count`` points uniform in the Euclidean ball B(center, radius): shape
  (count, n) for a 1-D ``center`` of length n.

  The key is split once: directions from the first half (`sphere`), radii
  radius U^{1/n} from the second.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax._src import sampling
    >>> pts = sampling.ball(jax.random.PRNGKey(0), jnp.zeros(3), 0.5, 4)
    >>> pts.shape, bool(jnp.all(jnp.linalg.norm(pts, axis=1) <= 0.5))
    ((4, 3), True)
  """
  n = center.shape[0]
  k1, k2 = jax.random.split(key)
  direction = sphere(k1, count, n, center.dtype)
  radii = radius * jax.random.uniform(k2, (count, 1), center.dtype) ** (1.0 / n)
  return center[None, :] + radii * direction
