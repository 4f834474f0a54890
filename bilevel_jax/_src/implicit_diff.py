"""The one home of implicit differentiation: closure conversion, the custom
rule that attaches a derivative to a solver, and the adjoint linear solves.

A solver computes y*(theta) by iterations that are never differentiated.  Its
derivative comes from an *optimality map* F with F(theta, y*(theta)) = 0
(the implicit function theorem): for a cotangent y-bar of y*,

    (d_y F)^T u = y-bar,                                                 (1)
    theta-bar = -(d_theta F)^T u,                                        (2)

(Blondel et al., "Efficient and modular implicit differentiation",
NeurIPS 2022, eq. (5); jaxopt's `root_vjp`).  The methods supply F and the
solve of (1):

* `bilevel_jax.implicit`: F = grad_y f(x, y), d_y F = hess_yy f symmetric
  positive definite: conjugate gradients (`cg`, optionally warm started and
  preconditioned by the lower solver's inverse estimate) or a dense LU
  (`dense`).
* `bilevel_jax.composite`: F = (grad_y L_{alpha,beta}, G - alpha p), (1)
  solved in the basis B of (3.6) by the Cholesky factor of the Newton matrix.
* `bilevel_jax.value.quadratic`: no linear solve at all (Danskin:
  grad v_mu = grad_x g~_mu at fixed y*, Prop. 3.4); it uses the rule below
  with an adjoint that is one VJP.

`solution_map(solve, adjoint)` is the custom rule of all three: theta (any
pytree, here the upper variable together with the arrays the user's
functions close over) gets its cotangent from ``adjoint``; the starting
point gets zero.  `closure_convert` turns the user's functions into
functions of explicit arguments so that arrays they close over get exact
cotangents too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

LINEAR_SOLVERS = ("cg", "dense")


# ------------------------------------------------------- closure conversion


def closure_convert(fn: Callable, *example_args):
  """``(converted, consts)`` with ``converted(*args, *consts) == fn(*args)``.

  Arrays ``fn`` closes over (traced or not) become the explicit ``consts``,
  so a custom rule can return their cotangents (`jax.closure_convert`).
  """
  converted, consts = jax.closure_convert(fn, *example_args)
  return converted, tuple(consts)


# --------------------------------------------------------- the custom rule


def zero_cotangent(tree):
  """Zeros like ``tree``: float0 for integer and boolean leaves."""

  def zero(leaf):
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)

  return jax.tree_util.tree_map(zero, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solution_map(solve, adjoint, theta, start):
  return solve(theta, start)[0]


def _solution_map_fwd(solve, adjoint, theta, start):
  out, saved = solve(theta, start)
  return out, (theta, start, saved)


def _solution_map_bwd(solve, adjoint, residuals, cotangent):
  theta, start, saved = residuals
  return adjoint(theta, saved, cotangent), zero_cotangent(start)


_solution_map.defvjp(_solution_map_fwd, _solution_map_bwd)


def solution_map(solve: Callable, adjoint: Callable, theta, start):
  """``solve(theta, start)[0]`` with the derivative ``adjoint`` in theta.

  Args:
    solve: ``(theta, start) -> (out, saved)``: the solver; ``out`` is what
      the caller gets (solution and diagnostics), ``saved`` what the
      backward pass needs.  Never differentiated.
    adjoint: ``(theta, saved, out_bar) -> theta_bar``: the cotangent of
      theta, typically `root_vjp` of the optimality map with a linear solve.
    theta: the differentiable inputs (pytree).
    start: the starting point (gets a zero cotangent).
  """
  return _solution_map(solve, adjoint, theta, start)


def root_vjp(optimality: Callable, theta, solution, u):
  """theta-bar of (2): -(d_theta F(theta, y*))^T u, given u solving (1)."""
  _, vjp = jax.vjp(lambda t: optimality(t, solution), theta)
  return vjp(jax.tree_util.tree_map(jnp.negative, u))[0]


# ------------------------------------------------------------ linear solves


def _relative(residual_norm, b_norm):
  return jnp.where(b_norm > 0, residual_norm / jnp.where(b_norm > 0, b_norm, 1), 0.0)


def cg(
  matvec: Callable,
  b,
  *,
  tol: float,
  max_steps: int,
  curvature: bool = False,
  x0=None,
  preconditioner: Callable | None = None,
):
  """Conjugate gradients for H v = b, H symmetric positive definite.

  Stops when ||r_k||_2 <= tol ||b||_2 (the criterion of
  `jax.scipy.sparse.linalg.cg` and jaxopt's `solve_cg`) or after
  ``max_steps`` iterations.  Returns ``(v, steps, residual)`` with residual
  = ||r_k|| / ||b|| (0 when b = 0), the recursive residual r_k = b - H v_k;
  with ``curvature=True`` also the smallest Rayleigh quotient p' H p / p' p
  over the directions (+inf when b = 0; NaN ones skipped): a value <= 0
  proves H is not positive definite.  The iteration itself does not change
  (a zero curvature still gives an infinite step, so v is NaN rather than
  silently wrong).

  ``x0``: a warm start (v_0 = x0, r_0 = b - H x0: one more product); the
  test stays relative to ||b||, so a good start saves iterations and gives
  the same accuracy.  ``preconditioner``: M ~ H^{-1}, symmetric positive
  definite, applied to each residual (preconditioned CG, Nocedal & Wright,
  Alg. 5.3); the stopping test is on the unpreconditioned residual, so the
  solution is as accurate as without it and only the iteration count
  changes (e.g. the L-BFGS inverse estimate of the lower solve, SHINE:
  Ramzi et al., ICLR 2022).
  """
  precondition = (lambda r: r) if preconditioner is None else preconditioner
  b_norm2 = jnp.vdot(b, b)
  threshold = tol**2 * b_norm2

  def cond(state):
    _, _, _, _, rs, k, _ = state
    return (rs > threshold) & (k < max_steps)

  def body(state):
    v, r, p, rz, rs, k, curv = state
    hp = matvec(p)
    php = jnp.vdot(p, hp)
    curv = jnp.fmin(curv, php / jnp.vdot(p, p))
    alpha = rz / php
    v = v + alpha * p
    r = r - alpha * hp
    z = precondition(r)
    rz_new = jnp.vdot(r, z)
    p = z + (rz_new / rz) * p
    return v, r, p, rz_new, jnp.vdot(r, r), k + 1, curv

  v0 = jnp.zeros_like(b) if x0 is None else x0
  r0 = b if x0 is None else b - matvec(x0)
  z0 = precondition(r0)
  init = (
    v0,
    r0,
    z0,
    jnp.vdot(r0, z0),
    jnp.vdot(r0, r0),
    jnp.array(0, jnp.int32),
    jnp.full((), jnp.inf, jnp.real(b_norm2).dtype),
  )
  v, _, _, _, rs, steps, curv = jax.lax.while_loop(cond, body, init)
  out = (v, steps, _relative(jnp.sqrt(rs), jnp.sqrt(b_norm2)))
  return out + (curv,) if curvature else out


def dense(matrix, b):
  """LU solve of a formed matrix: ``(v, 1, ||H v - b|| / ||b||)``."""
  v = jnp.linalg.solve(matrix, b)
  residual = jnp.linalg.norm(matrix @ v - b)
  return v, jnp.array(1, jnp.int32), _relative(residual, jnp.linalg.norm(b))


def symmetric_solve(
  method: str,
  operator: Callable,
  y,
  b,
  *,
  tol: float,
  max_steps: int,
  x0=None,
  preconditioner: Callable | None = None,
):
  """Solves J v = b with J = d operator / d y at ``y`` symmetric positive
  definite (a Hessian): ``method`` "cg" on Jacobian-vector products (from
  ``x0``, preconditioned by ``preconditioner``, see `cg`), or "dense" (form
  J by forward mode, LU).  Returns ``(v, steps, residual, curvature)``:
  curvature is CG's smallest Rayleigh quotient (`cg`), or the smallest
  eigenvalue of the symmetrized J for "dense"; <= 0 means J is not positive
  definite and v is not to be trusted."""
  if method == "dense":
    matrix = jax.jacfwd(operator)(y)
    curvature = jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T))[0]
    return dense(matrix, b) + (curvature,)
  _, matvec = jax.linearize(operator, y)
  return cg(
    matvec,
    b,
    tol=tol,
    max_steps=max_steps,
    curvature=True,
    x0=x0,
    preconditioner=preconditioner,
  )


def probe_curvature(operator: Callable, y):
  """v' J v / v' v at ``y`` (J = d operator / d y, a Hessian) along a fixed
  Rademacher direction v: one Jacobian-vector product.  A value <= 0 proves
  that J is not positive definite (a saddle point, a maximum, a singular
  Hessian); a positive value proves nothing."""
  v = jax.random.rademacher(jax.random.PRNGKey(0), y.shape, dtype=y.dtype)
  _, jv = jax.jvp(operator, (y,), (v,))
  return jnp.vdot(v, jv) / jnp.vdot(v, v)
