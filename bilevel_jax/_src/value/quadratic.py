"""Quadratic-regularization value function (Section 3).

    g~_mu(x, y) = g_mu(x, y) + mu/2 ||y||^2,                              (3.1)
    v_mu(x) = min_{y in Y} g~_mu(x, y),  S_mu(x) = argmin_{y in Y} g~_mu(x, y).  (3.2)

For g_mu(x, .) convex and Y closed convex, S_mu is single valued and
continuous (Lemma 3.1) and v_mu is C^1 with (Proposition 3.4)

    grad v_mu(x) = grad_x g_mu(x, S_mu(x)).

Practical choices (ours):

* The inner problem is mu-strongly convex; it is solved by FISTA (accelerated
  projected gradient) in a `lax.while_loop` with backtracking on the
  Lipschitz estimate L (doubling until the sufficient-decrease test holds,
  starting from a secant estimate at y0) and the gradient-based adaptive
  restart of O'Donoghue and Candes (2015). It stops when the gradient-mapping
  norm L ||z - P_Y(z - grad/L)|| at the extrapolated point is <= ``tol`` or
  after ``max_steps`` iterations; ``info.residual`` is the gradient mapping
  at the returned y. Since g~ is mu-strongly convex, ||y - S_mu(x)|| <=
  residual / mu: small mu needs a smaller tol for the same accuracy in y.
* The gradient is attached with `jax.custom_vjp`: the backward pass is one
  VJP of (x, mu) -> g_mu(x, y*) + mu/2 ||y*||^2 at the solver's y*, which is
  the only residual stored. The solver iterations are never differentiated.
  d v_mu / d mu = ||y*||^2 / 2 (+ d g_mu / d mu with ``pass_mu``).
* ``y`` (S_mu(x)) is returned as a constant for differentiation
  (`lax.stop_gradient`): differentiating S_mu would need second derivatives
  of g_mu, which Proposition 3.4 avoids.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import validation
from bilevel_jax._src.value import common


class QuadraticInfo(NamedTuple):
  """Diagnostics of `quadratic` (all arrays).

  Attributes:
    num_steps: FISTA iterations run.
    residual: gradient-mapping norm at the returned y (0 at S_mu(x)).
    lipschitz: final Lipschitz estimate L of grad_y g~_mu.
    restarts: number of momentum restarts.
    status: SUCCESS, MAX_STEPS or NONFINITE.
  """
  num_steps: jax.Array
  residual: jax.Array
  lipschitz: jax.Array
  restarts: jax.Array
  status: jax.Array


class QuadraticSolution(NamedTuple):
  """``value`` = v_mu(x) (differentiable, Prop. 3.4); ``y`` = S_mu(x)."""
  value: jax.Array
  y: Any
  info: QuadraticInfo


class _State(NamedTuple):
  y: jax.Array
  z: jax.Array
  t: jax.Array
  lip: jax.Array
  k: jax.Array
  res: jax.Array
  restarts: jax.Array


def _fista(h, project, y0, lip0, tol, max_steps, max_backtracks=40):
  """Minimizes h over {P(y)} from y0 (flat vectors). Returns (state, grad fn)."""
  grad_h = jax.grad(h)
  value_and_grad = jax.value_and_grad(h)

  def prox_step(z, hz, gz, lip):
    def cond(c):
      lip, y_new, j = c
      d = y_new - z
      ok = h(y_new) <= hz + jnp.vdot(gz, d) + 0.5 * lip * jnp.vdot(d, d) + 1e-12 * jnp.abs(hz)
      return jnp.logical_and(~ok, j < max_backtracks)

    def body(c):
      lip, _, j = c
      lip = 2.0 * lip
      return lip, project(z - gz / lip), j + 1

    lip, y_new, _ = lax.while_loop(cond, body, (lip, project(z - gz / lip), 0))
    return lip, y_new

  def cond(s):
    return jnp.logical_and(s.k < max_steps, ~(s.res <= tol))

  def body(s):
    hz, gz = value_and_grad(s.z)
    lip, y_new = prox_step(s.z, hz, gz, s.lip)
    res = lip * jnp.linalg.norm(s.z - y_new)
    restart = jnp.vdot(s.z - y_new, y_new - s.y) > 0
    t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t)))
    beta = jnp.where(restart, 0.0, (s.t - 1.0) / t_new)
    z_new = y_new + beta * (y_new - s.y)
    return _State(y_new, z_new, t_new.astype(s.t.dtype), lip, s.k + 1, res.astype(s.res.dtype),
                  s.restarts + restart.astype(s.restarts.dtype))

  dtype = y0.dtype
  y0 = project(y0)
  inf = jnp.asarray(jnp.inf, dtype)
  state = _State(y0, y0, jnp.ones((), dtype), lip0, jnp.zeros((), jnp.int32), inf,
                 jnp.zeros((), jnp.int32))
  state = lax.while_loop(cond, body, state)
  g_final = grad_h(state.y)
  final_res = state.lip * jnp.linalg.norm(state.y - project(state.y - g_final / state.lip))
  return state, final_res


def _initial_lipschitz(grad_h, y0, mu):
  """Secant estimate ||grad(y0 + d) - grad(y0)|| / ||d||, at least mu."""
  d = jnp.full_like(y0, 1e-3) * jnp.maximum(1.0, jnp.linalg.norm(y0)) / jnp.sqrt(y0.size)
  est = jnp.linalg.norm(grad_h(y0 + d) - grad_h(y0)) / jnp.linalg.norm(d)
  est = jnp.where(jnp.isfinite(est), est, 1.0)
  return jnp.maximum(est, mu)


def quadratic(g: Callable, x, *, mu, y0, projection: Optional[Callable] = None,
              tol: Optional[float] = None, max_steps: int = 2000,
              lipschitz=None, pass_mu: bool = False) -> QuadraticSolution:
  """Quadratic-regularization value function v_mu(x) of (3.2).

  Args:
    g: lower objective g_mu(x, y) -> scalar, convex and differentiable in y
      (a smoothing of a nonsmooth g, e.g. from `bilevel_jax.smoothing`).
      With ``pass_mu=True`` it is called as g(x, y, mu).
    x: upper variable (pytree of float arrays).
    mu: > 0; both the weight of mu/2 ||y||^2 and the value passed to g.
    y0: initial y (pytree); also fixes the structure of y.
    projection: P_Y acting on y's pytree (default: Y = R^m).
    tol: gradient-mapping tolerance (default 1e-9 in float64, 1e-4 in float32).
    max_steps: FISTA iteration cap (static).
    lipschitz: initial Lipschitz estimate of grad_y g~_mu (default: secant).
    pass_mu: call g(x, y, mu).

  Returns:
    `QuadraticSolution`: ``value`` (custom VJP by Prop. 3.4), ``y`` = S_mu(x)
    (not differentiated) and ``info``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import value, projections
    >>> g = lambda x, y: x * y[0]   # v(x) = -|x| on Y = [-1, 1]
    >>> sol = value.quadratic(g, 0.5, mu=1e-2, y0=jnp.zeros(1),
    ...                       projection=projections.box(-1.0, 1.0))
    >>> round(float(sol.value), 6), float(sol.y[0])  # -|x| + mu/2, y = -1
    (-0.495, -1.0)
  """
  g3 = common.lower_fn(g, pass_mu)
  common.check_mu(mu)
  max_steps = validation.check_positive_int("max_steps", max_steps)
  validation.check_float_leaves("x", x)
  validation.check_float_leaves("y0", y0)
  project_tree = projection if projection is not None else (lambda y: y)
  if not callable(project_tree):
    raise TypeError(f"`projection` must be callable, got {type(projection).__name__}.")
  validation.check_same_structure("projection", y0, jax.eval_shape(project_tree, y0),
                                  "projection(y0)")
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
  project = lambda v: ravel_pytree(project_tree(unravel(v)))[0].astype(dtype)
  solve = functools.partial(_solve, gp, project, tol, max_steps)
  lip0 = None if lipschitz is None else jnp.asarray(lipschitz, dtype)
  value, y_star, state, final_res = _value(gp, solve, (x, consts), mu, y_flat0, lip0)
  finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(y_star))
  status = jnp.where(~finite, common.NONFINITE,
                     jnp.where(final_res <= 10 * tol, common.SUCCESS, common.MAX_STEPS))
  info = QuadraticInfo(num_steps=state.k, residual=final_res, lipschitz=state.lip,
                       restarts=state.restarts, status=status)
  return QuadraticSolution(value=value, y=unravel(lax.stop_gradient(y_star)), info=info)


def _objective(gp, p, mu, y):
  return gp(p, y, mu) + 0.5 * mu * jnp.vdot(y, y)


def _solve(gp, project, tol, max_steps, p, mu, y0, lip0):
  h = lambda y: _objective(gp, p, mu, y)
  if lip0 is None:
    lip0 = _initial_lipschitz(jax.grad(h), project(y0), mu)
  state, final_res = _fista(h, project, y0, lip0, tol, max_steps)
  return state, final_res


def _value(gp, solve, p, mu, y0, lip0):
  """v_mu with the Proposition 3.4 gradient; y0 and lip0 get no gradient."""
  sg = lax.stop_gradient
  state, final_res = solve(sg(p), sg(mu), sg(y0), None if lip0 is None else sg(lip0))
  y_star = sg(state.y)
  return _envelope(gp, p, mu, y_star), y_star, state, final_res


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _envelope(gp, p, mu, y_star):
  """g~_mu(x, y*) whose derivative in (x, mu) treats y* as fixed (Prop. 3.4)."""
  return _objective(gp, p, mu, y_star)


def _envelope_fwd(gp, p, mu, y_star):
  return _objective(gp, p, mu, y_star), (p, mu, y_star)


def _envelope_bwd(gp, residuals, ct):
  p, mu, y_star = residuals
  _, vjp = jax.vjp(lambda pp, mm: _objective(gp, pp, mm, y_star), p, mu)
  d_p, d_mu = vjp(ct)
  return d_p, d_mu, jnp.zeros_like(y_star)


_envelope.defvjp(_envelope_fwd, _envelope_bwd)
