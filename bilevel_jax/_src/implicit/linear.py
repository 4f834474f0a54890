"""The adjoint linear system H v = b, H = hess_yy f(x, y*) symmetric positive
definite, solved matrix-free by conjugate gradients or densely.

Both return ``(v, steps, residual)`` with residual = ||H v - b||_2 / ||b||_2
(0 when b = 0), so a caller can report how well the adjoint was solved.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LINEAR_SOLVERS = ("cg", "dense")


def _relative(residual_norm, b_norm):
  return jnp.where(b_norm > 0, residual_norm / jnp.where(b_norm > 0, b_norm, 1), 0.0)


def cg(matvec: Callable, b, *, tol: float, max_steps: int):
  """Conjugate gradients from v = 0 (Hestenes-Stiefel).

  Stops when ||r_k||_2 <= tol ||b||_2, the criterion of
  `jax.scipy.sparse.linalg.cg` (and of jaxopt's `solve_cg`), or after
  ``max_steps`` iterations. The returned residual is the recursive one,
  r_k = b - H v_k, which equals the true residual up to rounding.
  """
  b_norm2 = jnp.vdot(b, b)
  threshold = tol ** 2 * b_norm2

  def cond(state):
    _, _, _, rs, k = state
    return (rs > threshold) & (k < max_steps)

  def body(state):
    v, r, p, rs, k = state
    hp = matvec(p)
    alpha = rs / jnp.vdot(p, hp)
    v = v + alpha * p
    r = r - alpha * hp
    rs_new = jnp.vdot(r, r)
    p = r + (rs_new / rs) * p
    return v, r, p, rs_new, k + 1

  init = (jnp.zeros_like(b), b, b, b_norm2, jnp.array(0, jnp.int32))
  v, _, _, rs, steps = jax.lax.while_loop(cond, body, init)
  return v, steps, _relative(jnp.sqrt(rs), jnp.sqrt(b_norm2))


def dense(hessian, b):
  """LU solve of the formed m x m Hessian (one step; exact residual)."""
  v = jnp.linalg.solve(hessian, b)
  residual = jnp.linalg.norm(hessian @ v - b)
  return v, jnp.array(1, jnp.int32), _relative(residual, jnp.linalg.norm(b))
