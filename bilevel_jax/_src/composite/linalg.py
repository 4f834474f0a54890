"""Small linear-algebra helpers of the composite solver.

`small_solve`: batches of tiny systems (the per-block KKT systems of the prox
and of the interior-point elimination, n <= 13) as unrolled Gaussian
elimination, so that under vmap they are fused elementwise work rather than
one LAPACK call per system.  `spd_solve`: Cholesky for the symmetric
positive definite Newton and Schur matrices.
`maybe`: a branch that costs nothing under vmap when no lane takes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def maybe(pred, fn, default):
  """fn() where pred, else default.  A while loop that runs at most once: under
  vmap it runs when some lane needs it, where lax.cond would run fn on every
  lane every time."""
  _, out = jax.lax.while_loop(
    lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn()), (jnp.asarray(pred), default)
  )
  return out


def small_solve(matrix, rhs):
  """matrix^{-1} rhs for one small (n, n) system, rhs (n,) or (n, r).

  Gaussian elimination with partial pivoting, unrolled over the static n,
  row swaps and substitution written with one-hot masks (no gathers or
  scatters).  A zero pivot gives non-finite entries, as LU does.
  """
  n = matrix.shape[0]
  vector = rhs.ndim == 1
  rhs = rhs[:, None] if vector else rhs
  aug = jnp.concatenate([matrix, rhs.astype(matrix.dtype)], axis=1)
  rows = jnp.arange(n)
  for k in range(n):
    col = jnp.where(rows >= k, jnp.abs(aug[:, k]), -1)
    top = col >= jnp.max(col)
    is_piv = top & (jnp.cumsum(top) == 1)
    row_piv = jnp.sum(jnp.where(is_piv[:, None], aug, 0), axis=0)
    row_k = aug[k]
    aug = (
      aug
      + jnp.where((rows == k)[:, None], row_piv - row_k, 0)
      + jnp.where(is_piv[:, None], row_k - row_piv, 0)
    )
    factors = jnp.where(rows > k, aug[:, k] / row_piv[k], 0)
    aug = aug - factors[:, None] * row_piv[None, :]
  upper, sol_rhs = aug[:, :n], aug[:, n:]
  sol = jnp.zeros_like(sol_rhs)
  for k in reversed(range(n)):
    row = (sol_rhs[k] - upper[k] @ sol) / upper[k, k]
    sol = jnp.where((rows == k)[:, None], row[None, :], sol)
  return sol[:, 0] if vector else sol


def spd_solve(matrix, rhs):
  """matrix^{-1} rhs for a symmetric positive definite matrix, by Cholesky.

  No LU fallback: g is convex and beta > 0, so the Newton and Schur matrices
  are positive definite; where rounding makes one numerically indefinite the
  solution is non-finite and the solver reports it (status NONFINITE).  (A
  fallback inside `maybe`, nested in the interior-point loop, deadlocked
  XLA's CPU runtime under vmap with --xla_cpu_multi_thread_eigen=false.)
  """
  return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(matrix), True), rhs)


def jtqj(jac, index, q, columns=None):
  """sum_b J_b^T Q_b J_b, J_b = jac[index_b] (k, m) the rows of grad G that
  block b of h reads and Q_b (k, k) (the projector P_b of the Newton matrix,
  the S_b of the interior-point step).

  Dense: one contraction, O(nb k m^2).  With ``columns`` (static (s,) ints:
  row i of jac is zero outside column columns[i], `structure.jacobian_columns`;
  the elastic net's G = e^l1 (y, -y)), J_b^T Q_b J_b has the k^2 entries
  jd_r Q_b[r, l] jd_l at (c_r, c_l), jd_r = jac[index_b[r], c_r]: a scatter-add
  of O(nb k^2), the same sum in another order (equal to rounding)."""
  m = jac.shape[1]
  q = q.astype(jac.dtype)
  if columns is None:
    jb = jac[index]  # (nb, k, m)
    return jnp.einsum("bkm,bkn->mn", jb, jnp.einsum("bkl,blm->bkm", q, jb))
  cols = jnp.asarray(columns)[index]  # (nb, k), static values
  jd = jac[index, cols]  # (nb, k)
  vals = q * jd[:, :, None] * jd[:, None, :]
  return jnp.zeros((m, m), jac.dtype).at[cols[:, :, None], cols[:, None, :]].add(vals)
