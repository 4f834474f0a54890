"""Quadratic-regularization value function (Section 3).

Equation, section, definition and proposition numbers refer to the value-function
smoothing paper of Alcantara, Nguyen, Chen and Lin (quadratic and entropic
regularization of the lower-level value function).

    g~_mu(x, y) = g_mu(x, y) + mu/2 ||y||^2,                              (3.1)
    v_mu(x) = min_{y in Y} g~_mu(x, y),  S_mu(x) = argmin_{y in Y} g~_mu(x, y).  (3.2)

For g_mu(x, .) convex and Y closed convex, S_mu is single valued and
continuous (Lemma 3.1) and v_mu is C^1 with (Proposition 3.4)

    grad v_mu(x) = grad_x g_mu(x, S_mu(x)).

Practical choices (ours):

* The inner problem is mu-strongly convex; it is solved by FISTA
  (`bilevel_jax._src.fista`: accelerated projected gradient) in a
  `lax.while_loop` with backtracking on the Lipschitz estimate L (doubling
  until the sufficient-decrease test holds, starting from a secant estimate at
  y0) and the gradient-mapping adaptive restart of O'Donoghue and Candes
  (2015). It stops when the gradient-mapping norm L ||z - P_Y(z - grad/L)|| at
  the extrapolated point is <= ``tol`` or after ``max_steps`` iterations;
  ``info.residual`` is the gradient mapping at the returned y. Since g~ is
  mu-strongly convex, ||y - S_mu(x)|| <= residual / mu: small mu needs a
  smaller tol for the same accuracy in y.
* The gradient is attached by `implicit_diff.solution_map` (the library's one
  custom rule) with theta = (x, the arrays g closes over, mu): the adjoint is
  one VJP of theta -> g_mu(x, y*) + mu/2 ||y*||^2 at the solver's y*, the only
  residual stored (Danskin; Prop. 3.4), so no linear solve is needed. The
  solver iterations are never differentiated. d v_mu / d mu = ||y*||^2 / 2
  (+ d g_mu / d mu with ``pass_mu``). y0, the initial Lipschitz estimate and
  arrays the projection closes over get zero cotangents.
* ``y`` (S_mu(x)) is returned as a constant for differentiation
  (`lax.stop_gradient`): differentiating S_mu would need second derivatives
  of g_mu, which Proposition 3.4 avoids.
* A feasible set that depends on x (or on any traced array: a projection
  ``lambda y: jnp.clip(y, -x, x)``) is differentiated too; Proposition 3.4
  assumes Y fixed. With p the arrays P_Y closes over, y* = P_{Y(p)}(z*) at
  z* = y* - grad_y g~_mu(x, y*) / L, and

      d v_mu / d p = grad_y g~_mu(x, y*)^T d_p P_{Y(p)}(z*),

  one more VJP, of the projection. (Differentiating the fixed point
  y* = P(z*) gives (I - J)^T u = grad_y g~ with J = D_z P (I - H / L); D_z P
  is symmetric and annihilates the normal direction z* - y*, which is
  parallel to grad_y g~, so u = grad_y g~ and no linear solve is needed.)
  It assumes strict complementarity (P differentiable at z*).
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import fista as fista_lib
from bilevel_jax._src import implicit_diff
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import validation
from bilevel_jax._src.value import common


class QuadraticInfo(NamedTuple):
  """Diagnostics of `quadratic` (all arrays).

  Attributes:
    num_steps: FISTA iterations run.
    status: SUCCESS, MAX_STEPS (residual > 10 tol after ``max_steps``),
      NONFINITE, or INVALID_INPUT for a traced ``mu`` that is not > 0
      (`bilevel_jax.Status`).
    residual: gradient-mapping norm at the returned y (0 at S_mu(x)).
    lipschitz: final Lipschitz estimate L of grad_y g~_mu.
    restarts: number of momentum restarts.
  """

  num_steps: jax.Array
  status: jax.Array
  residual: jax.Array
  lipschitz: jax.Array
  restarts: jax.Array


class QuadraticSolution(NamedTuple):
  """``value`` = v_mu(x) (differentiable, Prop. 3.4); ``y`` = S_mu(x)."""

  value: jax.Array
  y: Any
  info: QuadraticInfo


def _initial_lipschitz(grad_h, y0, mu):
  """Secant estimate ||grad(y0 + d) - grad(y0)|| / ||d||, at least mu."""
  d = jnp.full_like(y0, 1e-3) * jnp.maximum(1.0, jnp.linalg.norm(y0)) / jnp.sqrt(y0.size)
  est = jnp.linalg.norm(grad_h(y0 + d) - grad_h(y0)) / jnp.linalg.norm(d)
  est = jnp.where(jnp.isfinite(est), est, 1.0)
  return jnp.maximum(est, mu)


def _merge(consts, inexact, moving):
  """``consts`` with its inexact entries replaced, in order, by ``moving``."""
  moving = iter(moving)
  return [next(moving) if d else c for c, d in zip(consts, inexact)]


def quadratic(
  g: Callable,
  x,
  y0,
  *,
  mu,
  projection: Callable | None = None,
  tol: float | None = None,
  max_steps: int = 2000,
  lipschitz=None,
  pass_mu: bool = False,
  throw: bool = False,
) -> QuadraticSolution:
  """Quadratic-regularization value function v_mu(x) of (3.2).

  Args:
    g: lower objective g_mu(x, y) -> scalar, convex and differentiable in y
      (a smoothing of a nonsmooth g, e.g. from `bilevel_jax.smoothing`).
      With ``pass_mu=True`` it is called as g(x, y, mu).
    x: upper variable (pytree of float arrays).
    y0: initial y (pytree of float arrays); also fixes the structure of y.
    mu: > 0; both the weight of mu/2 ||y||^2 and the value passed to g.
    projection: P_Y acting on y's pytree (default: Y = R^m). It may close
      over x or other traced arrays (an x-dependent Y); they get their
      cotangents from d v_mu / d p = grad_y g~^T d_p P(z*) (module docstring).
    tol: gradient-mapping tolerance (default 1e-9 in float64, 1e-4 in float32).
    max_steps: FISTA iteration cap (static).
    lipschitz: initial Lipschitz estimate of grad_y g~_mu (default: secant).
    pass_mu: call g(x, y, mu).
    throw: raise `SolverError` when the status is not SUCCESS (see
      `bilevel_jax.Status`).

  Returns:
    `QuadraticSolution`: ``value`` (differentiable in x, mu and arrays g
    closes over, by Prop. 3.4), ``y`` = S_mu(x) (not differentiated) and
    ``info`` (`QuadraticInfo`).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import value, projections
    >>> g = lambda x, y: x * y[0]   # v(x) = -|x| on Y = [-1, 1]
    >>> sol = value.quadratic(g, 0.5, jnp.zeros(1), mu=1e-2,
    ...                       projection=projections.box(-1.0, 1.0))
    >>> round(float(sol.value), 6), float(sol.y[0]), int(sol.info.status)  # -|x| + mu/2, y = -1
    (-0.495, -1.0, 0)
    >>> round(float(jax.grad(lambda x: value.quadratic(g, x, jnp.zeros(1), mu=1e-2,
    ...     projection=projections.box(-1.0, 1.0)).value)(0.5)), 6)  # grad v_mu = S_mu(x)
    -1.0
  """
  g3 = common.lower_fn(g, pass_mu)
  common.check_mu(mu)
  max_steps = validation.check_positive_int("max_steps", max_steps)
  common.check_variable("x", x)
  common.check_variable("y0", y0)
  project_tree = projection if projection is not None else (lambda y: y)
  if not callable(project_tree):
    raise TypeError(f"`projection` must be callable, got {type(projection).__name__}.")
  validation.check_same_structure(
    "projection", y0, jax.eval_shape(project_tree, y0), "projection(y0)"
  )
  if lipschitz is not None:
    validation.check_positive("lipschitz", lipschitz)
  y_flat0, unravel = ravel_pytree(y0)
  dtype = y_flat0.dtype
  if tol is None:
    tol = 1e-9 if dtype == jnp.float64 else 1e-4
  validation.check_positive("tol", tol)
  mu = common.as_scalar(mu, dtype)
  common.check_g(g3, x, y0, mu)
  gp, consts = common.convert(lambda xx, yy, m: g3(xx, unravel(yy), m), x, y_flat0, mu)
  # Arrays the projection closes over (x for an x-dependent Y) become inputs
  # of the custom rule, so that they get cotangents too.
  project_p, pconsts = implicit_diff.closure_convert(
    lambda v: ravel_pytree(project_tree(unravel(v)))[0].astype(dtype), y_flat0
  )
  lip0 = None if lipschitz is None else jnp.asarray(lipschitz, dtype)

  def objective(theta, y):
    p, m, _ = theta
    return gp(p, y, m) + 0.5 * m * jnp.vdot(y, y)

  def solve(theta, start):
    """FISTA on g~_mu(x, .) over Y; out = (v_mu, y*, state, residual)."""
    y_start, lip_start = start
    project = lambda v: project_p(v, *theta[2])
    h = lambda y: objective(theta, y)
    grad_h = jax.grad(h)
    y_start = project(y_start)
    if lip_start is None:
      lip_start = _initial_lipschitz(grad_h, y_start, theta[1])
    state = fista_lib.fista(
      project,
      y_start,
      fun=h,
      lipschitz=lip_start,
      tol=tol,
      max_steps=max_steps,
      backtracking=True,
      restart="gradient_mapping",
    )
    final_res = fista_lib.gradient_mapping(grad_h, project, state.x, state.lipschitz)
    y_star = state.x
    return (h(y_star), y_star, state, final_res), (y_star, state.lipschitz)

  def adjoint(theta, saved, out_bar):
    """Prop. 3.4: the cotangent of v_mu at fixed y* (one VJP, no solve); the
    projection's arrays p: grad_y g~^T d_p P(z*) (module docstring)."""
    y_star, lip = saved
    (p, m, pc) = theta
    _, vjp = jax.vjp(lambda t: objective((t[0], t[1], pc), y_star), (p, m))
    ct_p, ct_m = vjp(out_bar[0])[0]
    ct_pc = implicit_diff.zero_cotangent(pc)
    if pc:
      g = jax.grad(lambda y: objective(theta, y))(y_star)
      z = y_star - g / lip
      inexact = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in pc]
      moving = [c for c, d in zip(pc, inexact) if d]
      _, vjp_p = jax.vjp(lambda *cs: project_p(z, *_merge(pc, inexact, cs)), *moving)
      ct_moving = iter(vjp_p(out_bar[0] * g))
      ct_pc = tuple(next(ct_moving) if d else zero for d, zero in zip(inexact, ct_pc))
    return ct_p, ct_m, ct_pc

  value, y_star, state, final_res = implicit_diff.solution_map(
    solve, adjoint, ((x, consts), mu, pconsts), (y_flat0, lip0)
  )
  y_star = lax.stop_gradient(y_star)
  finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(y_star))
  status = jnp.where(
    ~finite,
    status_lib.NONFINITE,
    jnp.where(final_res <= 10 * tol, status_lib.SUCCESS, status_lib.MAX_STEPS),
  )
  status = status_lib.unless_invalid(validation.is_positive(mu), status)
  info = QuadraticInfo(
    num_steps=state.num_steps,
    status=status,
    residual=final_res,
    lipschitz=state.lipschitz,
    restarts=state.restarts,
  )
  status_lib.raise_if_failed(status, throw=throw, where="value.quadratic")
  return QuadraticSolution(value=value, y=unravel(y_star), info=info)
