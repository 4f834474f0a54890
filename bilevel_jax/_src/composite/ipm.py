"""Primal-dual interior-point method for the regularized lower level (3.1).

Section 5.1's joint form in (y, w), with h written through its epigraph
block by block (t_b >= <a_j, w_b> - alpha_j, <b_i, w_b> <= beta_i):

    min  g(x, y) + beta/2 |y|^2 + sum_b [ t_b + |w_b - G_b(x, y)|^2 / (2 alpha) ]
    s.t. s = c0 + [j piece] t - C w >= 0          (C rows: a_j then b_i)

KKT, with multipliers lam >= 0 of the rows (the sigma and tau of (2.2)):

    grad_y g + beta y + grad G^T p = 0,      p = (G - w) / alpha on covered z,
    p_b = C_b^T lam_b,   sum_j sigma_j = 1,   s lam = mu -> 0.

Each Newton step eliminates (w_b, t_b, s_b, lam_b) block by block (a
(k+1) x (k+1) system per block, unrolled elimination) and solves an m x m
symmetric positive definite system in y (Cholesky).  Interior
points cross any number of active-set changes per step, which is what the
Newton method on the Moreau envelope cannot do when alpha is small (each of
its line searches stops at the first kink): on the elastic net of Section 6.1
with alpha = 1e-6 it needs 20-40 steps where the envelope Newton stalls.

Coordinates of z that no block reads have h = 0 there; their w equals G and
they drop out.  Returns y; the caller recomputes w = prox(G(y)) exactly.

Stopping (ours).  The KKT error cannot fall below what rounding allows: p =
(G - w) / alpha carries eps |G| / alpha of noise, so for small alpha the
error levels off far above eps^0.6 while mu keeps shrinking, and some 20
steps later s and lam underflow and the iterates blow up (1e-7 -> 1e21 ->
1e58 -> NaN on a lasso at alpha = 1e-8).  The loop therefore keeps its best
iterate (least error) and stops when the error has not halved in `PATIENCE`
steps (the attainable accuracy: status INACCURATE), when it grew a
`DIVERGED` factor above the best or became non-finite (divergence: status
NONFINITE), at tol (SUCCESS) or at max_steps (MAX_STEPS).  The best iterate
is returned in every case.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bilevel_jax._src import status as status_lib
from bilevel_jax._src.composite import linalg

PATIENCE = 8  # steps without halving the error before the loop stops
DIVERGED = 1e6  # error growth over the best that counts as divergence


class _Group(NamedTuple):
  rows: Any  # (nb, n, k) constraint rows C
  offsets: Any  # (nb, n) c0
  is_piece: Any  # (1, n) 1.0 for max pieces, 0.0 for constraints
  index: Any  # (nb, k)


class _Loop(NamedTuple):
  y: Any
  blocks: Any
  k: Any
  err: Any  # error of the current iterate (inf once non-finite)
  y_best: Any
  err_best: Any
  err_ref: Any  # error when it last halved, at step k_ref
  k_ref: Any


def _groups(h, dtype):
  out = []
  for g in h.groups:
    num_j = g.a.shape[1]
    rows = jnp.concatenate([g.a, g.b], axis=1).astype(dtype)
    offsets = jnp.concatenate([g.alpha, g.beta], axis=1).astype(dtype)
    is_piece = (jnp.arange(rows.shape[1]) < num_j).astype(dtype)[None, :]  # (1, n)
    out.append(_Group(rows, offsets, is_piece, g.index))
  return out


def solve(
  g_fn,
  G_fn,
  lin_fn,
  h,
  y0,
  alpha,
  beta,
  *,
  max_steps: int = 80,
  tol=None,
  active=True,
  columns=None,
):
  """Interior-point solve of (3.1); returns (y, steps, kkt_error, status).

  y is the best iterate (least KKT error), kkt_error its error, status a
  `bilevel_jax.Status` code: SUCCESS (error <= tol), INACCURATE (stopped at
  the attainable accuracy above tol), NONFINITE (diverged: the error grew
  `DIVERGED`-fold above the best or became non-finite), MAX_STEPS.

  Args:
    g_fn: y -> g(x, y); G_fn: y -> G(x, y); lin_fn: (y, p) -> (hess_yy of
      g + <G, p> + beta/2 |y|^2 (dense, m x m), grad_y G (s x m)).
    h: the Polyhedral; y0: start; alpha, beta: the regularization.
    active: when False (traced), no step is taken (a switch that costs
      nothing under vmap when no lane needs the phase).
    columns: None, or the static (s,) columns that the rows of grad_y G are
      supported on (G separable in y): the J^T S J term of the y-system is
      then a scatter-add (`linalg.jtqj`).
  """
  dtype = y0.dtype
  eps = jnp.finfo(dtype).eps
  tol = tol if tol is not None else float(eps) ** 0.6
  groups = _groups(h, dtype)

  def init_block(gr, z):
    zb = z[gr.index]  # (nb, k)
    w = zb
    pieces = jnp.einsum("bnk,bk->bn", gr.rows, w) - gr.offsets
    t = jnp.max(jnp.where(gr.is_piece > 0, pieces, -jnp.inf), axis=1)
    s = gr.offsets + gr.is_piece * t[:, None] - jnp.einsum("bnk,bk->bn", gr.rows, w)
    s = jnp.maximum(s, 0) + 1.0
    lam = jnp.where(gr.is_piece > 0, 1.0 / jnp.sum(gr.is_piece), 1.0)
    lam = jnp.broadcast_to(lam, s.shape).astype(dtype)
    return w, t, s, lam

  z0 = G_fn(y0)
  blocks0 = tuple(init_block(gr, z0) for gr in groups)

  def residuals(y, blocks):
    z, vjp = jax.vjp(G_fn, y)
    p = jnp.zeros_like(z)
    out = []
    for gr, (w, t, s, lam) in zip(groups, blocks):
      pb = (z[gr.index] - w) / alpha
      p = p.at[gr.index].set(pb)
      r_w = -pb + jnp.einsum("bnk,bn->bk", gr.rows, lam)
      r_t = 1 - jnp.einsum("n,bn->b", gr.is_piece[0], lam)
      r_p = jnp.einsum("bnk,bk->bn", gr.rows, w) - gr.offsets - gr.is_piece * t[:, None] + s
      out.append((r_w, r_t, r_p))
    r_y = jax.grad(g_fn)(y) + beta * y + vjp(p)[0]
    return r_y, p, out

  def measure(y, blocks):
    r_y, p, res = residuals(y, blocks)
    scale = 1 + jnp.max(jnp.abs(r_y - vjp_free(y, p)))
    worst = jnp.max(jnp.abs(r_y)) / scale
    gap, count = 0.0, 0
    for (r_w, r_t, r_p), (_, _, s, lam) in zip(res, blocks):
      worst = jnp.maximum(worst, jnp.max(jnp.abs(r_w)) / (1 + jnp.max(jnp.abs(lam))))
      worst = jnp.maximum(worst, jnp.max(jnp.abs(r_t), initial=0.0))
      worst = jnp.maximum(worst, jnp.max(jnp.abs(r_p), initial=0.0))
      gap = gap + jnp.sum(s * lam)
      count += s.size
    mu = gap / max(count, 1)
    return jnp.maximum(worst, mu), mu

  def duality_measure(blocks):
    """Mean complementarity s lam (no residuals: they are computed once per step)."""
    gap = sum(jnp.sum(s * lam) for (_, _, s, lam) in blocks)
    return gap / max(sum(s.size for (_, _, s, _) in blocks), 1)

  def vjp_free(y, p):
    return jax.vjp(G_fn, y)[1](p)[0]

  def step(state):
    y, blocks = state
    r_y, p, res = residuals(y, blocks)
    mu = duality_measure(blocks)
    sigma = 0.1
    target = sigma * mu
    matrix, jac = lin_fn(y, p)  # (m, m), (s, m)
    rhs = -r_y
    solves = []
    for gr, (_w, _t, s, lam), (r_w, r_t, r_p) in zip(groups, blocks, res):
      d = lam / s  # (nb, n)
      e = (target - s * lam + lam * r_p) / s  # (nb, n)
      crow = gr.rows  # (nb, n, k)
      k_ = crow.shape[2]
      piece = gr.is_piece[0]  # (n,)
      f_w = -r_w - jnp.einsum("bnk,bn->bk", crow, e)
      f_t = -r_t + jnp.einsum("n,bn->b", piece, e)
      # dt eliminated: dt = (f_t + <d pi, C dw>) / sum_pieces d.  What remains
      # on dw is I/alpha + E with E = C^T L C, L the weighted Laplacian of the
      # pieces (diag d_i sum_{j != i} d_j / sum d, off-diagonal -d_i d_j /
      # sum d, no differences of large numbers) and diag(d) on constraints.
      dp = d * gr.is_piece  # (nb, n)
      total = jnp.sum(dp, axis=1)  # (nb,) > 0
      others = jnp.einsum("ij,bj->bi", 1 - jnp.eye(piece.shape[0], dtype=dtype), dp)
      lap = -dp[:, :, None] * dp[:, None, :] / total[:, None, None]
      diag = jnp.where(gr.is_piece > 0, dp * others / total[:, None], d)
      both_pieces = (piece[:, None] * piece[None, :])[None]
      lap = jnp.where(
        jnp.eye(piece.shape[0], dtype=bool)[None], diag[:, :, None], lap * both_pieces
      )
      e_mat = jnp.einsum("bnk,bnl,blj->bkj", crow, lap, crow)  # (nb, k, k)
      g_w = f_w + jnp.einsum("bnk,bn->bk", crow, dp) * (f_t / total)[:, None]
      # dw = R (alpha g_w + J dy) with R = (I + alpha E)^-1; the y-system
      # gains J^T S J with S = E R = (I - R)/alpha, solved for directly (no
      # cancellation when alpha E is small) and symmetrized.
      eye = jnp.eye(k_, dtype=dtype)
      both = jax.vmap(linalg.small_solve)(
        eye[None] + alpha * e_mat,
        jnp.concatenate([jnp.broadcast_to(eye, e_mat.shape), e_mat], axis=2),
      )
      r_mat, s_mat = both[:, :, :k_], both[:, :, k_:]
      s_mat = 0.5 * (s_mat + jnp.swapaxes(s_mat, 1, 2))
      jb = jac[gr.index]  # (nb, k, m)
      matrix = matrix + linalg.jtqj(jac, gr.index, s_mat, columns)
      rg = jnp.einsum("bkl,bl->bk", r_mat, g_w)
      rhs = rhs + jnp.einsum("bkm,bk->m", jb, rg)
      solves.append((r_mat, rg, jb, d, e, dp, total, f_t))
    dy = linalg.spd_solve(matrix, rhs)

    directions = []
    alpha_p, alpha_d = jnp.ones((), dtype), jnp.ones((), dtype)
    for gr, (_w, _t, s, lam), (_r_w, _r_t, r_p), (r_mat, rg, jb, d, e, dp, total, f_t) in zip(
      groups, blocks, res, solves
    ):
      dw = alpha * rg + jnp.einsum("bkl,blm,m->bk", r_mat, jb, dy)
      dt = (f_t + jnp.einsum("bn,bnk,bk->b", dp, gr.rows, dw)) / total
      cdw = jnp.einsum("bnk,bk->bn", gr.rows, dw) - gr.is_piece * dt[:, None]
      ds = -r_p - cdw
      dlam = d * cdw + e
      alpha_p = jnp.minimum(alpha_p, jnp.min(jnp.where(ds < 0, -s / ds, jnp.inf), initial=jnp.inf))
      alpha_d = jnp.minimum(
        alpha_d, jnp.min(jnp.where(dlam < 0, -lam / dlam, jnp.inf), initial=jnp.inf)
      )
      directions.append((dw, dt, ds, dlam))
    alpha_p = jnp.minimum(1.0, 0.99 * alpha_p)
    alpha_d = jnp.minimum(1.0, 0.99 * alpha_d)
    new_blocks = tuple(
      (w + alpha_p * dw, t + alpha_p * dt, s + alpha_p * ds, lam + alpha_d * dlam)
      for (w, t, s, lam), (dw, dt, ds, dlam) in zip(blocks, directions)
    )
    y_new = y + alpha_p * dy
    err, _ = measure(y_new, new_blocks)
    return y_new, new_blocks, err

  def body(st):
    y_new, new_blocks, err = step((st.y, st.blocks))
    finite = jnp.isfinite(err) & jnp.all(jnp.isfinite(y_new))
    err = jnp.where(finite, err, jnp.inf).astype(dtype)
    better = err < st.err_best
    halved = err <= 0.5 * st.err_ref
    return _Loop(
      y_new,
      new_blocks,
      st.k + 1,
      err,
      jnp.where(better, y_new, st.y_best),
      jnp.where(better, err, st.err_best),
      jnp.where(halved, err, st.err_ref),
      jnp.where(halved, st.k + 1, st.k_ref),
    )

  def diverged(st):
    return ~(st.err <= DIVERGED * st.err_best)  # also when err is inf or NaN

  def stalled(st):
    return st.k - st.k_ref >= PATIENCE

  def cond(st):
    return active & (st.err_best > tol) & (st.k < max_steps) & ~stalled(st) & ~diverged(st)

  err0, _ = measure(y0, blocks0)
  err0 = err0.astype(dtype)
  zero = jnp.array(0, jnp.int32)
  st = jax.lax.while_loop(cond, body, _Loop(y0, blocks0, zero, err0, y0, err0, err0, zero))
  status = jnp.where(
    st.err_best <= tol,
    status_lib.SUCCESS,
    jnp.where(
      diverged(st),
      status_lib.NONFINITE,
      jnp.where(stalled(st), status_lib.INACCURATE, status_lib.MAX_STEPS),
    ),
  )
  return st.y_best, st.k, st.err_best, status
