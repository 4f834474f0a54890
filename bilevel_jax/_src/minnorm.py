"""Small quadratic programs of the gradient-sampling methods, solved in JAX.

`min_norm_hull`: the minimum-norm element of con{w_1, ..., w_N} (Algorithm 1
of Solla & Royset), by Wolfe's (1976) finite active-set algorithm on the
Gram matrix; exact up to rounding, a few dozen linear solves of size <= N + 1.

`sqp_direction`: the subproblem (5.5) of Algorithm 2 through its dual, a
concave QP over a simplex times r capped simplices, by accelerated projected
gradient with restarts, stopped on the duality gap.

Both are inner solves of the gradient-sampling drivers, which pass their
``info.status`` (a `bilevel_jax.Status` code) on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bilevel_jax._src import fista as fista_lib
from bilevel_jax._src import status as status_lib


class MinNormInfo(NamedTuple):
  """Diagnostics of `min_norm_hull` (all arrays).

  Attributes:
    num_steps: major iterations of Wolfe's method.
    status: SUCCESS, MAX_STEPS (the gap is above ``tol`` after ``max_steps``
      major iterations) or NONFINITE (a non-finite point or weight).
    gap: |w|^2 - min_i <w, w_i>, 0 at the optimum (the optimality gap of
      the QP; compared with tol * max_i |w_i|^2).
  """

  num_steps: Any
  status: Any
  gap: Any


class MinNormSolution(NamedTuple):
  """The min-norm element ``point`` = W^T ``weights`` of the hull, and info."""

  point: Any
  weights: Any
  info: MinNormInfo


def _affine_min_norm(gram, mask):
  """Min-norm point of the affine hull of the masked points: weights mu with
  sum mu = 1, (gram mu)_S = const, mu = 0 off S (tiny ridge for safety)."""
  n = gram.shape[0]
  dtype = gram.dtype
  ridge = jnp.finfo(dtype).eps * 10 * (1 + jnp.max(jnp.abs(jnp.diag(gram))))
  mf = mask.astype(dtype)
  top = jnp.where(
    mask[:, None] & mask[None, :],
    gram + ridge * jnp.eye(n, dtype=dtype),
    jnp.eye(n, dtype=dtype) * (1 - mf)[:, None],
  )
  matrix = jnp.block([[top, -mf[:, None]], [mf[None, :], jnp.zeros((1, 1), dtype)]])
  rhs = jnp.concatenate([jnp.zeros(n, dtype), jnp.ones(1, dtype)])
  return jnp.linalg.solve(matrix, rhs)[:n]


def min_norm_hull(
  points, *, max_steps: int | None = None, tol=None, throw: bool = False
) -> MinNormSolution:
  """argmin |w| over w in con{points[i]} (points: (N, n)).

  Wolfe's algorithm: keep a corral S of affinely independent points whose
  affine-hull min-norm point lies in their relative interior; add the point
  most "below" the current w; when the affine min-norm point leaves the
  simplex, step back to its boundary and drop the points that reach zero.
  It stops when the gap |w|^2 - min_i <w, w_i> is at most tol max_i |w_i|^2
  or the point minimizing <w, w_i> is already in the corral.

  Args:
    points: (N, n) array.
    max_steps: major iterations at most (default 4 N + 10).
    tol: relative tolerance on the gap (default 1e3 eps).
    throw: raise `bilevel_jax.SolverError` when ``info.status`` is not
      SUCCESS (see `bilevel_jax.Status`).

  Returns:
    `MinNormSolution(point, weights, info)`; ``info.status`` is NONFINITE
    when a point, the result or the gap is not finite.

  Raises:
    ValueError: ``points`` is not a non-empty (N, n) array.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import upper
    >>> sol = upper.min_norm_hull(jnp.array([[1.0, 1.0], [1.0, -1.0]]))
    >>> [float(v) for v in sol.point], int(sol.info.status)
    ([1.0, 0.0], 0)
  """
  points = jnp.asarray(points)
  if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] == 0:
    raise ValueError(
      f"`points` must be a non-empty (N, n) array (N points of R^n), got shape {points.shape}."
    )
  if not jnp.issubdtype(points.dtype, jnp.floating):
    points = points.astype(jnp.result_type(float))
  n_pts = points.shape[0]
  dtype = points.dtype
  # Wolfe's method is scale invariant: run it on points / s, s = max |entry|,
  # so that the Gram matrix neither overflows nor underflows.
  s = jnp.max(jnp.abs(jnp.where(jnp.isfinite(points), points, 0)))
  s = jnp.where(s > 0, s, 1)
  gram = (points / s) @ (points / s).T
  max_steps = max_steps or 4 * n_pts + 10
  eps = jnp.finfo(dtype).eps
  tol = tol if tol is not None else 1e3 * eps
  scale = jnp.max(jnp.diag(gram))

  first = jnp.argmin(jnp.diag(gram))
  lam0 = jnp.zeros(n_pts, dtype).at[first].set(1)
  mask0 = jnp.arange(n_pts) == first

  def gap_of(lam):
    v = gram @ lam
    return jnp.vdot(lam, v) - jnp.min(v), jnp.argmin(v)

  def minor(state):
    lam, mask = state

    def cond(s):
      lam, mask, mu, k = s
      return jnp.any(mask & (mu <= 0)) & (k < n_pts)

    def body(s):
      lam, mask, mu, k = s
      bad = mask & (mu <= 0)
      ratios = jnp.where(bad, lam / jnp.maximum(lam - mu, eps), jnp.inf)
      theta = jnp.clip(jnp.min(ratios), 0, 1)
      lam = jnp.where(mask, lam + theta * (mu - lam), 0)
      mask = mask & (lam > eps * 10)
      lam = jnp.where(mask, lam, 0)
      lam = lam / jnp.sum(lam)
      mu = _affine_min_norm(gram, mask)
      return lam, mask, mu, k + 1

    mu = _affine_min_norm(gram, mask)
    lam, mask, mu, _ = jax.lax.while_loop(cond, body, (lam, mask, mu, 0))
    return jnp.where(mask, mu, 0), mask

  def cond(state):
    lam, mask, k, done = state
    return (~done) & (k < max_steps)

  def body(state):
    lam, mask, k, _ = state
    gap, j = gap_of(lam)
    done = (gap <= tol * scale) | mask[j]
    new_mask = mask.at[j].set(True)
    lam_n, mask_n = minor((lam, new_mask))
    lam = jnp.where(done, lam, lam_n)
    mask = jnp.where(done, mask, mask_n)
    return lam, mask, k + 1, done

  lam, mask, steps, done = jax.lax.while_loop(cond, body, (lam0, mask0, 0, jnp.array(False)))
  gap, _ = gap_of(lam)
  point = points.T @ lam
  finite = (
    jnp.all(jnp.isfinite(point))
    & jnp.all(jnp.isfinite(lam))
    & jnp.isfinite(gap)
    & jnp.all(jnp.isfinite(points))
  )
  gap = gap * s * s
  status = jnp.where(
    ~finite,
    status_lib.NONFINITE,
    jnp.where(done | (gap <= tol * scale), status_lib.SUCCESS, status_lib.MAX_STEPS),
  ).astype(jnp.int32)
  info = MinNormInfo(jnp.asarray(steps, jnp.int32), status, gap)
  status_lib.raise_if_failed(status, throw=throw, where="upper.min_norm_hull")
  return MinNormSolution(point, lam, info)


# ------------------------------------------------------------------- (5.5)


def project_capped_simplex(v):
  """Projection onto {x >= 0, sum x <= 1}."""
  clipped = jnp.maximum(v, 0)
  return jnp.where(jnp.sum(clipped) <= 1, clipped, fista_lib.project_simplex(v))


class SQPDirectionInfo(NamedTuple):
  """Diagnostics of `sqp_direction` (all arrays).

  Attributes:
    num_steps: iterations of the dual solver.
    status: SUCCESS, MAX_STEPS (the relative duality gap is above tol after
      max_steps iterations) or NONFINITE.
    gap: (q(d) - dual) / (1 + |q(d)|), the quantity compared with tol.
  """

  num_steps: Any
  status: Any
  gap: Any


class SQPDirectionSolution(NamedTuple):
  """d minimizing q(d) of (5.5), q(d), the dual value, and info."""

  direction: Any
  model_value: Any
  dual_value: Any
  info: SQPDirectionInfo


def sqp_direction(
  f_value, f_grads, c_values, c_grads, rho, *, max_steps: int = 5000, tol=None
) -> SQPDirectionSolution:
  """Solves (5.5) with the sampled gradients:

      min_d rho max_i (f + <w_i, d>) + sum_k max_i max(c_k + <w_ki, d>, 0) + |d|^2/2.

  Dual: max over lam in simplex, mu_k in {mu >= 0, sum mu <= 1} of
  rho f + sum_k c_k sum(mu_k) - |v|^2/2 with v = rho W^T lam + sum_k W_k^T mu_k,
  and d = -v.  Accelerated projected gradient (`bilevel_jax._src.fista`,
  step 1 / ||W W^T||_2, adaptive restart when the momentum points uphill) on
  the dual; stops when q(d) - dual <= tol (1 + |q(d)|).

  Args:
    f_value: f at x (scalar); f_grads: (N, n).
    c_values: (r,); c_grads: (r, N, n).
    rho: penalty weight.
    max_steps: iterations of the dual solver at most.
    tol: on the relative duality gap (default 100 eps^0.75).

  Returns:
    `SQPDirectionSolution(direction, model_value, dual_value, info)`.
  """
  dtype = f_grads.dtype
  tol = tol if tol is not None else 1e2 * jnp.finfo(dtype).eps ** 0.75
  r, n_pts = c_grads.shape[0], f_grads.shape[0]
  stacked = jnp.concatenate([rho * f_grads[None], c_grads], axis=0)  # (r+1, N, n)
  flat = stacked.reshape(-1, stacked.shape[-1])
  lipschitz = jnp.linalg.norm(flat @ flat.T, ord=2)
  step = 1 / jnp.maximum(lipschitz, jnp.finfo(dtype).tiny)
  lin = jnp.concatenate(
    [jnp.zeros((1, n_pts), dtype), jnp.broadcast_to(c_values[:, None], (r, n_pts))], 0
  )

  def project(z):
    first = fista_lib.project_simplex(z[0])[None]
    rest = jax.vmap(project_capped_simplex)(z[1:])
    return jnp.concatenate([first, rest], 0)

  def primal(z):
    v = jnp.einsum("kj,kjn->n", z, stacked)
    d = -v
    q = rho * jnp.max(f_value + f_grads @ d)
    q = q + jnp.sum(
      jnp.max(jnp.maximum(c_values[:, None] + jnp.einsum("kjn,n->kj", c_grads, d), 0), axis=1)
    )
    q = q + 0.5 * jnp.vdot(d, d)
    dual = rho * f_value + jnp.sum(lin * z) - 0.5 * jnp.vdot(v, v)
    return d, q, dual

  def grad(z):
    v = jnp.einsum("kj,kjn->n", z, stacked)
    return lin - jnp.einsum("kjn,n->kj", stacked, v)

  def gap(z):
    _, q, dual = primal(z)
    return (q - dual) / (1 + jnp.abs(q))

  z0 = jnp.concatenate([jnp.full((1, n_pts), 1 / n_pts, dtype), jnp.zeros((r, n_pts), dtype)], 0)
  # Ascent on the dual, z <- P(y + step grad(y)), written as `fista`'s descent
  # step y - g / L with g = -step grad(y) and L = 1 (the same floating-point
  # operations); restart when the momentum points uphill for the dual.
  state = fista_lib.fista(
    project,
    z0,
    grad=lambda y: -(step * grad(y)),
    lipschitz=1.0,
    max_steps=max_steps,
    tol=tol,
    restart=lambda z, y, g, z_new: jnp.sum(grad(y) * (z_new - z)) < 0,
    residual=gap,
  )
  d, q, dual = primal(state.x)
  finite = jnp.all(jnp.isfinite(d)) & jnp.isfinite(q)
  status = jnp.where(
    ~finite,
    status_lib.NONFINITE,
    jnp.where(state.residual <= tol, status_lib.SUCCESS, status_lib.MAX_STEPS),
  )
  return SQPDirectionSolution(
    d, q, dual, SQPDirectionInfo(state.num_steps, status.astype(jnp.int32), state.residual)
  )
