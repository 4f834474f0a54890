"""Doubly-regularized composite lower level and its implicit hypergradient.

Lower level (Solla & Royset, (1.2)):  min_y g(x, y) + h(G(x, y)), with g and
each G_i convex and C^2 in y and h nondecreasing epi-polyhedral (2.6).

Regularized problem (3.1):

    Y_{a,b}(x) = argmin_y  phi(y) = g(x, y) + e_a h(G(x, y)) + b/2 |y|^2,

a strongly convex C^1 problem (Proposition 3.1).  With w = prox_{a h}(G) and
p = (G - w) / a (Section 5.1), grad phi = grad_y g + grad_y G^T p + b y, and
(y, p) solves (3.2).  p is computed as a^T sigma + b^T tau from the prox's
multipliers (2.2) (`polyhedral.multiplier`), not as (G - w) / a, whose
cancellation costs eps |G| / a: more than p itself at a = 1e-8 in float64 or
a = 1e-6 in float32.  We minimize phi by a damped semismooth Newton method:
the generalized Hessian of phi is

    M = hess_yy L_{a,b}(x, y, p) + grad_y G^T P grad_y G / a,

with P the orthogonal projector onto K_{h*}(p, w) (the s-part of the basis B
in (3.6), taken from the active pieces at w (5.1)).  M is exactly the Schur
complement of B^T A B in (3.6): the Newton matrix and the derivative share
their linear algebra.  Armijo backtracking on phi globalizes it.

Newton on phi alone is slow when alpha is small and y0 far from the solution:
each line search stops at the first kink of e_a h it crosses, so the active
set changes by about one piece per step (on the elastic net of Section 6.1
with alpha = 1e-6 it stalls after hundreds of steps).  By default a
primal-dual interior-point phase on the joint (y, w) problem (`ipm.py`)
first brings y close; Newton on phi, with the exact prox, then polishes.

Derivative (3.6), by the custom rule of `bilevel_jax._src.implicit_diff`
(the solver's iterations are never differentiated).  The optimality map is

    F(theta; y, p) = (grad_y L_{a,b}(x, y, p), G(x, y) - a p),
    theta = (x, the arrays g and G close over, h, a, b),

and for a cotangent c = (c_y, c_p), u = B (B^T A B)^{-1} B^T c is

    (hess L + grad G^T P grad G / a) u_y = c_y + grad G^T P c_p / a,
    u_p = P (grad G u_y - c_p) / a,

and theta-bar = -(d_theta F)^T u at fixed (y, p) (`implicit_diff.root_vjp`):
x-bar = -d/dx [grad_y L; G]^T u, a-bar = <p, u_p>, b-bar = -<y, u_y>, and
zero for the data of h (F does not read them).  The unregularized formula
(3.14) (Theorem 3.3, for problems satisfying (SOSC)) solves the saddle
system with a = b = 0 instead, and F without a and b (zero a-bar, b-bar).

Diagnostics (Section 5): ``info.ri_violated`` flags solutions where the
relative interior condition of Theorem 3.2 fails (an active piece with a
zero multiplier), and ``info.condition_number`` bounds the condition number
of B^T A B from below, the quantity whose growth as a, b -> 0 the paper
(after Theorem 5.3) names as the sign that (SOSC) fails.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import hypergradient as hypergradient_lib
from bilevel_jax._src import implicit_diff
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import validation
from bilevel_jax._src import variables
from bilevel_jax._src.composite import ipm
from bilevel_jax._src.composite import linalg
from bilevel_jax._src.composite import polyhedral as poly
from bilevel_jax._src.composite import structure

DERIVATIVES = ("regularized", "unregularized")
LINEAR_SOLVERS = ("auto", "dense", "cg")
METHODS = ("ipm", "newton", "warm")
DENSE_MAX = 2000


class CompositeInfo(NamedTuple):
  """Diagnostics of `solve` (all arrays).

  Attributes:
    num_steps: Newton iterations on phi taken (after the interior-point
      phase; with method="warm", those before and after it).
    status: a `bilevel_jax.Status` code: SUCCESS, MAX_STEPS, NONFINITE,
      LINESEARCH_FAILED or INACCURATE.  SUCCESS exactly when the relative
      residual at the returned y is at most max(tol, floor / scale), the
      rounding floor (see ``tol`` of `solve`) and the scale taken at that y,
      and floor / scale <= eps^(1/4); INACCURATE when the residual is at the
      floor but the floor is above eps^(1/4) (rounding leaves the point
      uncertified).
    residual: |grad_y g + grad_y G^T p + beta y|_inf, the residual of (3.2)
      (its second line holds exactly: p in dh(w) from the exact prox w).
    relative_residual: residual / (1 + |grad_y g|_inf + beta |y|_inf), the
      quantity compared with ``tol``.
    interior_steps: interior-point iterations (method="ipm" or "warm"), else 0.
    interior_status: the interior-point phase's own `bilevel_jax.Status`:
      SUCCESS (KKT error below eps^0.6, or the phase did not run), INACCURATE
      (stopped where rounding keeps the error from falling further; Newton
      polishes), NONFINITE (it diverged; its best iterate was kept) or
      MAX_STEPS.  ``status`` is decided at the returned point alone; a
      diverged phase whose point Newton could not bring to tol makes it
      NONFINITE.
    ri_violated: True when the relative interior condition of Theorem 3.2
      fails at the solution: an active piece or constraint of h at
      G - alpha p whose multiplier in (2.2) is zero (below sqrt(eps) times
      the block's largest; `polyhedral.ri_violated`).  S_{alpha,beta} may be
      nondifferentiable there; the derivative uses the active set found.
    num_active: number of active pieces and constraints of h at G - alpha p.
    condition_number: a cheap lower bound on the 2-norm condition number of
      B^T A B in (3.6), read off the Cholesky factor L of its Schur
      complement, the Newton matrix M = hess L + grad G^T P grad G / alpha,
      that the last Newton step formed anyway: since hess L and M^{-1} are
      blocks of B^T A B and of its inverse, lambda_min(M) <= min_i L_ii^2,
      and a matrix's norm is at least its largest entry,

          cond(B^T A B) >= max(1, |hess L|_max / min_i L_ii^2),

      with |hess L|_max = max_i (hess L)_ii (hess L is positive semidefinite).

      It is an estimate from below (it may read 1 for a matrix whose
      condition number is larger), free of the 1/alpha scale of M: it stays
      bounded as alpha, beta -> 0 where (SOSC) holds and grows like 1/beta
      where the curvature of L on the critical cone vanishes, the failure
      signal of Section 5 (after Theorem 5.3).  M is the Newton matrix at
      the solution when hess L and grad G do not depend on (y, p) and the
      active set did not change in the last step, else at the iterate before
      the solution; where no Newton step followed the interior-point phase,
      M is factored at the solution for it.  NaN when matrix-free
      (linear_solver="cg"), and for a warm start (method="warm") that
      already solved (3.2): no matrix was formed, and forming one would cost
      more than such a solve.
    objective: phi(y) of (3.1) at the returned y.
  """

  num_steps: Any
  status: Any
  residual: Any
  relative_residual: Any
  interior_steps: Any
  interior_status: Any
  ri_violated: Any
  num_active: Any
  condition_number: Any
  objective: Any


class CompositeSolution(NamedTuple):
  """y = Y_{alpha,beta}(x), its multiplier p from (3.2), and diagnostics."""

  y: Any
  p: Any
  info: CompositeInfo


class _Options(NamedTuple):
  tol: float
  max_steps: int
  derivative: str
  linear_solver: str
  max_backtracks: int
  cg_max_steps: int
  method: str
  warm_steps: int


# ---------------------------------------------------------------- the model


class _Model(NamedTuple):
  """Closure-converted g and G with flat y; x stays a pytree."""

  g: Any
  G: Any


def _lagrangian_grad(model, x, consts, y, p, beta):
  """grad_y L_{alpha,beta}(x, y, p) = grad_y g + grad_y G^T p + beta y."""
  g_consts, G_consts = consts
  gy = jax.grad(lambda yy: model.g(x, yy, *g_consts))(y)
  _, vjp = jax.vjp(lambda yy: model.G(x, yy, *G_consts), y)
  return gy + vjp(p)[0] + beta * y, gy


def _jacobian_G(model, x, consts, y):
  return jax.jacfwd(lambda yy: model.G(x, yy, *consts[1]))(y)


def _hessian_L(model, x, consts, y, p, beta, dense):
  """hess_yy of g + <G, p> + beta/2 |y|^2: a matrix, or a matvec."""
  g_consts, G_consts = consts

  def lag(yy):
    return (
      model.g(x, yy, *g_consts)
      + jnp.vdot(model.G(x, yy, *G_consts), p)
      + 0.5 * beta * jnp.vdot(yy, yy)
    )

  if dense:
    return jax.hessian(lag)(y)
  grad = jax.grad(lag)
  return lambda v: jax.jvp(grad, (y,), (v,))[1]


# ---------------------------------------------------- dense linear algebra


class _Structure(NamedTuple):
  """Static: hess_yy L independent of (y, p); grad_y G independent of y;
  ``columns``: None, or the (s,) column of y that each row of grad_y G is
  supported on (G separable in y, `structure.jacobian_columns`), where the
  Newton and interior-point matrices' grad G^T Q grad G terms are a
  scatter-add of O(s k) entries (`linalg.jtqj`) instead of an O(s k m^2)
  contraction."""

  hess_const: bool
  jac_const: bool
  columns: Any = None


def _structure(model, x, consts, y, p, dense) -> _Structure:
  if not dense:
    return _Structure(False, False)
  zero = jnp.zeros((), y.dtype)
  hess = lambda xx, cc, yy, pp: _hessian_L(model, xx, cc, yy, pp, zero, True)
  jac = lambda xx, cc, yy: _jacobian_G(model, xx, cc, yy)
  columns = structure.jacobian_columns(
    lambda xx, cc, yy: model.G(xx, yy, *cc), (x, consts[1], y), 2
  )
  return _Structure(
    not structure.depends_on(hess, (x, consts, y, p), (2, 3)),
    not structure.depends_on(jac, (x, consts, y), (2,)),
    None if columns is None else tuple(int(c) for c in columns),
  )


class _Lin(NamedTuple):
  """Dense hess_yy L (with beta I) and grad_y G; ``have`` says whether the
  constant parts are already computed (see _Structure)."""

  hess: Any
  jac: Any
  have: Any


def _empty_lin(y, s):
  m = y.shape[0]
  return _Lin(jnp.zeros((m, m), y.dtype), jnp.zeros((s, m), y.dtype), jnp.array(False))


def _update_lin(model, x, consts, y, p, beta, struct, lin, jac=None):
  """hess and jac at (y, p): constant parts computed once, then reused; a
  ``jac`` already computed at y (not constant) is taken as it is."""

  def hess_at():
    return _hessian_L(model, x, consts, y, p, beta, dense=True)

  def jac_at():
    return _jacobian_G(model, x, consts, y) if jac is None else jac

  if struct.hess_const and struct.jac_const:
    hess, jac = linalg.maybe(~lin.have, lambda: (hess_at(), jac_at()), (lin.hess, lin.jac))
  else:
    hess = linalg.maybe(~lin.have, hess_at, lin.hess) if struct.hess_const else hess_at()
    jac = linalg.maybe(~lin.have, jac_at, lin.jac) if struct.jac_const else jac_at()
  return _Lin(hess, jac, jnp.array(True))


def _gauss_newton_term(h, states, jac, columns=None):
  """grad G^T P grad G with P the block-diagonal projector onto K_{h*}
  (`linalg.jtqj`; structured where G is separable in y)."""
  out = jnp.zeros((jac.shape[1], jac.shape[1]), jac.dtype)
  for g, st in zip(h.groups, states):
    out = out + linalg.jtqj(jac, g.index, st.projector, columns)
  return out


class _Factor(NamedTuple):
  """The Cholesky factor of the Newton matrix M = hess L + grad G^T P grad G /
  alpha, and the active pieces P was built from."""

  chol: Any
  active: Any


def _factor(h, states, lin, alpha, columns=None):
  matrix = lin.hess + _gauss_newton_term(h, states, lin.jac, columns) / alpha
  return _Factor(jnp.linalg.cholesky(matrix), tuple(st.active for st in states))


def _factor_solve(factor, rhs):
  """M^{-1} rhs by the Cholesky factor (M is positive definite: g convex,
  beta > 0; see linalg.spd_solve)."""
  return jax.scipy.linalg.cho_solve((factor.chol, True), rhs)


def _matrix_free_solve(model, x, consts, y, p, beta, h, states, alpha, rhs, options):
  """Solves (hess L + grad G^T P grad G / alpha) u = rhs by CG."""
  G_y = lambda yy: model.G(x, yy, *consts[1])
  _, vjp = jax.vjp(G_y, y)
  hvp = _hessian_L(model, x, consts, y, p, beta, dense=False)

  def matvec(v):
    jv = jax.jvp(G_y, (y,), (v,))[1]
    return hvp(v) + vjp(poly.project_dual(h, states, jv))[0] / alpha

  sol, _, _ = implicit_diff.cg(
    matvec, rhs, tol=float(jnp.finfo(rhs.dtype).eps) ** 0.75, max_steps=options.cg_max_steps
  )
  return sol


def _dense(options, m) -> bool:
  return options.linear_solver == "dense" or (options.linear_solver == "auto" and m <= DENSE_MAX)


# ------------------------------------------------------------ forward solve


def _evaluate(model, h, x, consts, y, alpha, beta):
  """phi(y), p, grad phi and the prox states at y."""
  g_consts, G_consts = consts
  z = model.G(x, y, *G_consts)
  w, states = poly.prox(h, z, alpha)
  p = poly.multiplier(h, states, z)  # = (z - w) / alpha, without cancellation
  envelope = poly.max_part(h, w) + 0.5 * alpha * jnp.vdot(p, p)
  phi = model.g(x, y, *g_consts) + envelope + 0.5 * beta * jnp.vdot(y, y)
  grad, gy = _lagrangian_grad(model, x, consts, y, p, beta)
  scale = 1 + jnp.max(jnp.abs(gy)) + beta * jnp.max(jnp.abs(y))
  return phi, p, grad, states, scale


class _Newton(NamedTuple):
  """Loop state of Newton on phi."""

  y: Any
  phi: Any
  p: Any
  grad: Any
  states: Any
  scale: Any
  step: Any
  status: Any  # < 0 while running; STALLED: the warm phase gave up
  rel: Any
  slow: Any  # consecutive steps that did not halve rel
  floor: Any  # rounding floor of the residual (from grad G)
  lin: _Lin
  factor: Any  # _Factor of the last step (dense), or None
  condition: Any  # _condition_lower_bound of the last step's factor (NaN: none)


STALLED = -2


def _rounding_floor(model, h, x, consts, y, p, states, jac, alpha):
  """10 eps |grad G|^T (|p| + r), the rounding of grad_y G^T p: p is exact to
  eps |p| where one piece of a block is active and carries eps r more where
  several are (r = (|G_b| + |c0_b|) / alpha there, else 0:
  `polyhedral.multiplier_rounding`); tol is raised to it."""
  eps = float(jnp.finfo(y.dtype).eps)
  z = model.G(x, y, *consts[1])
  noise = jnp.abs(p) + poly.multiplier_rounding(h, states, z, alpha)
  return 10 * eps * jnp.max(jnp.abs(jac).T @ noise)


def _jac_and_floor(model, h, x, consts, y, p, states, alpha, struct, lin):
  """grad_y G at y and the rounding floor of the residual at y (dense mode).

  The floor that a point's residual is tested against is computed at that
  same point: taken from an earlier iterate (a diverged one, |G| ~ 1e33), it
  once let a wrong point pass as converged."""
  if struct.jac_const:
    jac = linalg.maybe(~lin.have, lambda: _jacobian_G(model, x, consts, y), lin.jac)
  else:
    jac = _jacobian_G(model, x, consts, y)
  return jac, _rounding_floor(model, h, x, consts, y, p, states, jac, alpha)


def _accepted(rel, floor, scale, tol):
  """The convergence test: rel <= max(tol, floor / scale), all at one point."""
  return rel <= jnp.maximum(tol, floor / scale)


def _newton_init(
  model, h, x, consts, y0, alpha, beta, options, struct, lin, factor, floor, condition
):
  """The loop state at y0; in dense mode the floor is computed at y0 (and
  lin.jac holds grad G at y0 where it is not constant), else ``floor``."""
  phi, p, grad, states, scale = _evaluate(model, h, x, consts, y0, alpha, beta)
  if factor is not None:
    jac, floor = _jac_and_floor(model, h, x, consts, y0, p, states, alpha, struct, lin)
    if not struct.jac_const:
      lin = lin._replace(jac=jac)
  rel = jnp.max(jnp.abs(grad)) / scale
  status = jnp.where(_accepted(rel, floor, scale, options.tol), status_lib.SUCCESS, -1)
  return _Newton(
    y0,
    phi,
    p,
    grad,
    states,
    scale,
    jnp.array(0, jnp.int32),
    status,
    rel,
    jnp.array(0, jnp.int32),
    floor,
    lin,
    factor,
    condition,
  )


def _newton_loop(model, h, x, consts, alpha, beta, options, struct, init, *, max_steps, warm):
  """Damped Newton on phi with model-minimizer directions (see above).

  With ``warm``, the loop also stops (status STALLED) when a step fails to
  halve the relative residual twice in a row and the last step left the
  active set unchanged, or after ``max_steps`` steps: the active set of the
  warm start is then too far off for Newton, whose line searches stop at the
  first kink of e_alpha h, and the caller switches to the interior-point
  method.  Steps that change the active set are progress (the residual of a
  piecewise-quadratic phi need not fall while the pieces are being found):
  on Algorithm 1 for the elastic net (6.1), counting them as stalls sent 32%
  of the warm solves to the interior point (about 12 steps each), where
  Newton alone needed a median of 7 steps; not counting them, 15%.
  """
  eps = float(jnp.finfo(init.y.dtype).eps)
  dense = init.factor is not None

  def cond(st):
    return (st.status < 0) & (st.status != STALLED) & (st.step < max_steps)

  def body(st):
    if dense:
      # lin.jac is grad G at st.y (computed with the floor at the end of the
      # last step) where it is not constant.
      lin = _update_lin(
        model,
        x,
        consts,
        st.y,
        st.p,
        beta,
        struct,
        st.lin,
        jac=None if struct.jac_const else st.lin.jac,
      )
      factor = _factor(h, st.states, lin, alpha, struct.columns)
      direction = _factor_solve(factor, -st.grad)
      condition = _condition_lower_bound(factor, lin)
    else:
      lin, factor, condition = st.lin, None, st.condition
      direction = _matrix_free_solve(
        model, x, consts, st.y, st.p, beta, h, st.states, alpha, -st.grad, options
      )
    slope = jnp.vdot(st.grad, direction)

    # Line search on t -> phi(y + t d): t = 1 when Armijo accepts it (Newton's
    # step).  Else phi'(t) = <grad phi(y + t d), d> > 0 somewhere in (0, 1]
    # (phi is convex): its root, the minimizer along d, is bracketed and
    # found by safeguarded regula falsi (Illinois); a trial is accepted once
    # Armijo holds and |phi'(t)| <= |phi'(0)| / 10.  Halving alone would stop
    # short of the first kink of e_alpha h on the way (Newton's model there
    # is the wrong piece) and gain only a factor 2 per step; landing past it
    # lets the next step see the right active set.  Each trial is a full
    # evaluation, and the accepted one is reused.
    def ls_cond(ls):
      t, k, ev, _, _, _, _, accepted = ls
      return (k == 0) | ((~accepted) & (k <= options.max_backtracks))

    def ls_body(ls):
      t, k, _, lo, hi, dlo, dhi, _ = ls
      bracket = dhi > 0
      secant = lo - dlo * (hi - lo) / jnp.where(bracket, dhi - dlo, 1)
      width = hi - lo
      secant = jnp.clip(secant, lo + 0.01 * width, hi - 0.01 * width)
      t = jnp.where(k == 0, 1.0, jnp.where(bracket, secant, 0.5 * t)).astype(t.dtype)
      ev = _evaluate(model, h, x, consts, st.y + t * direction, alpha, beta)
      dphi = jnp.vdot(ev[2], direction)
      slack = 10 * eps * (1 + jnp.abs(st.phi))
      armijo = jnp.isfinite(ev[0]) & (ev[0] <= st.phi + 1e-4 * t * slope + slack)
      flat = jnp.abs(dphi) <= 0.1 * jnp.abs(slope)
      accepted = armijo & ((k == 0) | flat | (width <= 1e-6) | (k >= 8))
      # New bracket [lo, hi] around the root of phi'; Illinois: halve the
      # derivative kept at an end that survives twice.
      right = jnp.isfinite(dphi) & (dphi > 0)
      new_lo = jnp.where(right, lo, t)
      new_dlo = jnp.where(right, dlo * jnp.where(k > 1, 0.5, 1.0), dphi)
      new_hi = jnp.where(right, t, hi)
      new_dhi = jnp.where(right, dphi, dhi * jnp.where(bracket & (k > 1), 0.5, 1.0))
      new_dhi = jnp.where(jnp.isfinite(dphi), new_dhi, dhi)
      return t, k + 1, ev, new_lo, new_hi, new_dlo, new_dhi, accepted

    current = (st.phi, st.p, st.grad, st.states, st.scale)
    zero = jnp.zeros((), st.y.dtype)
    one = jnp.ones((), st.y.dtype)
    t, k, trial, _, _, _, _, accepted = jax.lax.while_loop(
      ls_cond, ls_body, (one, 0, current, zero, one, slope, -one, jnp.array(False))
    )
    failed = ~accepted
    y_new = jnp.where(failed, st.y, st.y + t * direction)
    phi_n, p_n, grad_n, states_n, scale_n = jax.tree_util.tree_map(
      lambda new, old: jnp.where(failed, old, new), trial, current
    )
    rel = jnp.max(jnp.abs(grad_n)) / scale_n
    floor = st.floor
    if dense:
      jac_n, floor = _jac_and_floor(model, h, x, consts, y_new, p_n, states_n, alpha, struct, lin)
      if not struct.jac_const:
        lin = lin._replace(jac=jac_n)
    finite = jnp.all(jnp.isfinite(y_new)) & jnp.isfinite(phi_n) & poly.prox_ok(states_n)
    converged = _accepted(rel, floor, scale_n, options.tol)
    status = jnp.where(
      ~finite,
      status_lib.NONFINITE,
      jnp.where(converged, status_lib.SUCCESS, jnp.where(failed, status_lib.LINESEARCH_FAILED, -1)),
    )
    slow = jnp.where(rel > 0.5 * st.rel, st.slow + 1, 0)
    if warm is not False:  # True, or a traced flag (one trace for both rounds of "warm")
      changed = jnp.array(False)
      for old_state, new_state in zip(st.states, states_n):
        changed = changed | jnp.any(old_state.active != new_state.active)
      stalled = ((slow >= 2) & ~changed) | (st.step + 1 >= max_steps)
      status = jnp.where(warm & (status < 0) & stalled, STALLED, status)
    return _Newton(
      y_new,
      phi_n,
      p_n,
      grad_n,
      states_n,
      scale_n,
      st.step + 1,
      status,
      rel,
      slow,
      floor,
      lin,
      factor,
      condition,
    )

  return jax.lax.while_loop(cond, body, init)


def _placeholder_factor(y0, h):
  m = y0.shape[0]
  zeros = jnp.zeros((m, m), y0.dtype)
  active = tuple(jnp.zeros(g.a.shape[:1] + (g.a.shape[1] + g.b.shape[1],), bool) for g in h.groups)
  return _Factor(zeros, active)


def _ipm_phase(model, h, x, consts, y, alpha, beta, options, struct, lin, active):
  """The interior-point method from y where ``active``; (y, steps, status, lin).

  y is the phase's best iterate (`ipm.solve`), status its code (SUCCESS where
  the phase did not run)."""
  g_consts, G_consts = consts
  p0 = jnp.zeros((h.size,), y.dtype)
  if struct.hess_const or struct.jac_const:
    lin = linalg.maybe(
      active & ~lin.have, lambda: _update_lin(model, x, consts, y, p0, beta, struct, lin), lin
    )

  def lin_fn(yy, pp):
    hess = lin.hess if struct.hess_const else _hessian_L(model, x, consts, yy, pp, beta, True)
    jac = lin.jac if struct.jac_const else _jacobian_G(model, x, consts, yy)
    return hess, jac

  y_ipm, steps, _, status = ipm.solve(
    lambda yy: model.g(x, yy, *g_consts),
    lambda yy: model.G(x, yy, *G_consts),
    lin_fn,
    h,
    y,
    alpha,
    beta,
    max_steps=options.max_steps,
    active=active,
    columns=struct.columns,
  )
  y_ipm = jnp.where(active & jnp.all(jnp.isfinite(y_ipm)), y_ipm, y)
  status = jnp.where(active, status, status_lib.SUCCESS).astype(jnp.int32)
  return y_ipm, jnp.asarray(steps, jnp.int32), status, lin


def _forward(model, h, x, consts, y0, alpha, beta, options):
  """The solve of (3.1): (y, p, prox states, info, (factor, lin, same) or None).

  method "ipm": interior point, then Newton on phi.  "newton": Newton only.
  "warm": Newton from y0 for at most warm_steps steps; where it stalls, the
  interior point from its last iterate, then Newton again.  In dense mode
  the Cholesky factor of the last Newton step's matrix and the dense hess L,
  grad G it was built from are returned too, with ``same``: whether it is
  the Newton matrix at the solution (the Hessian and grad G are constant and
  the active set did not change since).  The derivative refactors where not
  (`_dense_factor`); a solve that is not differentiated costs nothing more.
  """
  m = y0.shape[0]
  dense = _dense(options, m)
  struct = _structure(model, x, consts, y0, jnp.zeros((h.size,), y0.dtype), dense)
  lin = _empty_lin(y0, h.size)
  factor = _placeholder_factor(y0, h) if dense else None
  floor = jnp.zeros((), y0.dtype)
  no_condition = jnp.full((), jnp.nan, y0.dtype)
  init = functools.partial(_newton_init, model, h, x, consts)
  loop = functools.partial(_newton_loop, model, h, x, consts, alpha, beta, options, struct)
  ipm_steps = jnp.array(0, jnp.int32)
  if options.method == "warm":
    # Round 0: Newton from y0 (at most warm_steps steps, stops where it
    # stalls); round 1, only where round 0 did not succeed: the interior point
    # from its last iterate, then Newton.  One while loop over the rounds, so
    # that the Newton loop (and the interior point) is traced and compiled
    # once, not once per round: the jaxpr of a warm solve shrank by a third.
    class _Round(NamedTuple):
      st: Any
      round: Any
      steps: Any  # Newton steps of both rounds
      ipm_steps: Any
      ipm_status: Any

    def round_cond(c):
      return (c.round == 0) | ((c.round == 1) & (c.st.status != status_lib.SUCCESS))

    def round_body(c):
      st, second = c.st, c.round > 0
      y_start = jnp.where(second & jnp.all(jnp.isfinite(st.y)), st.y, y0)
      y_ipm, k_ipm, s_ipm, lin_ipm = _ipm_phase(
        model, h, x, consts, y_start, alpha, beta, options, struct, st.lin, second
      )
      start = init(y_ipm, alpha, beta, options, struct, lin_ipm, st.factor, st.floor, st.condition)
      st = loop(
        start,
        max_steps=jnp.where(second, options.max_steps, options.warm_steps),
        warm=~second,
      )
      return _Round(
        st,
        c.round + 1,
        c.steps + st.step,
        jnp.where(second, k_ipm, c.ipm_steps),
        jnp.where(second, s_ipm, c.ipm_status),
      )

    # Before round 0 only y0, lin, the factor, floor and condition are read
    # (the loop state at y0 is built inside, so `_newton_init` is traced once).
    shapes = jax.eval_shape(
      lambda: init(y0, alpha, beta, options, struct, lin, factor, floor, no_condition)
    )
    blank = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    blank = blank._replace(y=y0, lin=lin, factor=factor, floor=floor, condition=no_condition)
    zero = jnp.array(0, jnp.int32)
    rounds = jax.lax.while_loop(
      round_cond,
      round_body,
      _Round(blank, zero, zero, zero, jnp.array(status_lib.SUCCESS, jnp.int32)),
    )
    ipm_ran = rounds.round > 1
    st, steps = rounds.st, rounds.steps
    ipm_steps, ipm_status = rounds.ipm_steps, rounds.ipm_status
    # Steps of the Newton run after the interior point (none without it).
    st = st._replace(step=jnp.where(ipm_ran, st.step, 0))
  else:
    y_start = y0
    ipm_status = jnp.array(status_lib.SUCCESS, jnp.int32)
    if options.method == "ipm":
      y_start, ipm_steps, ipm_status, lin = _ipm_phase(
        model, h, x, consts, y0, alpha, beta, options, struct, lin, jnp.array(True)
      )
    start = init(y_start, alpha, beta, options, struct, lin, factor, floor, no_condition)
    ipm_ran = jnp.array(options.method == "ipm")
    st = loop(start, max_steps=options.max_steps, warm=False)
    steps = st.step
  res = jnp.max(jnp.abs(st.grad))
  status = _final_status(st, res, ipm_status, options)
  dense_data = None
  condition = no_condition
  if dense:
    same = jnp.array(struct.hess_const and struct.jac_const) & (steps > 0)
    for old, new in zip(st.factor.active, st.states):
      same = same & jnp.all(old == new.active)
    usable = same | (st.step > 0)
    # No Newton step after an interior-point phase: one factorization at the
    # solution, a small part of that solve's cost (a warm start that was
    # already a solution forms none: it would cost more than the solve).
    fresh = ~usable & ipm_ran

    def refactor():
      lin_y = _update_lin(model, x, consts, st.y, st.p, beta, struct, st.lin)
      factor_y = _factor(h, st.states, lin_y, alpha, struct.columns)
      return factor_y, lin_y, jnp.array(True), _condition_lower_bound(factor_y, lin_y)

    factor, lin, exact, cond = linalg.maybe(
      fresh, refactor, (st.factor, st.lin, same, st.condition)
    )
    dense_data = (factor, lin, exact)
    condition = jnp.where(usable | fresh, cond, no_condition)
  info = CompositeInfo(
    num_steps=steps.astype(jnp.int32),
    status=status.astype(jnp.int32),
    residual=res,
    relative_residual=res / st.scale,
    interior_steps=ipm_steps,
    interior_status=ipm_status,
    ri_violated=poly.ri_violated(st.states),
    num_active=poly.count_active(st.states).astype(jnp.int32),
    condition_number=condition,
    objective=st.phi,
  )
  return st.y, st.p, st.states, info, dense_data


def _final_status(st, res, ipm_status, options):
  """The status of the returned point, decided there alone.

  SUCCESS exactly when its relative residual is at most max(tol, floor /
  scale), floor and scale computed at that point (`_accepted`), and floor /
  scale is at most eps^(1/4) (above it rounding leaves the point uncertified:
  INACCURATE).  Otherwise the Newton loop's code (MAX_STEPS when it ran out of
  steps, LINESEARCH_FAILED, NONFINITE), except that a diverged interior-point
  phase (its status NONFINITE, `ipm.solve`) makes it NONFINITE: the cause to
  report."""
  eps = float(jnp.finfo(st.y.dtype).eps)
  rel = res / st.scale
  certified = st.floor / st.scale <= eps**0.25
  ok = jnp.isfinite(res) & _accepted(rel, st.floor, st.scale, options.tol) & certified
  status = jnp.where(st.status < 0, status_lib.MAX_STEPS, st.status)
  status = jnp.where(jnp.isfinite(res), status, status_lib.NONFINITE)
  status = jnp.where(ipm_status == status_lib.NONFINITE, status_lib.NONFINITE, status)
  status = jnp.where(status == status_lib.SUCCESS, status_lib.INACCURATE, status)
  return jnp.where(ok, status_lib.SUCCESS, status)


def _dense_factor(model, theta, y, p, states, dense_data):
  """(factor, lin) of the Newton matrix at the solution for the derivative:
  the forward pass's last one where it is that matrix, else a new one."""
  x, consts, h, alpha, beta = theta
  factor, lin, same = dense_data
  struct = _structure(model, x, consts, y, jnp.zeros_like(p), True)

  def refactor():
    lin_y = _update_lin(model, x, consts, y, p, beta, struct, lin)
    return _factor(h, states, lin_y, alpha, struct.columns), lin_y

  return linalg.maybe(~same, refactor, (factor, lin))


def _condition_lower_bound(factor, lin):
  """max(1, max_i (hess L)_ii / min_i L_ii^2), a lower bound on cond(B^T A B)
  (see CompositeInfo.condition_number); L the Cholesky factor of M.  O(m):
  hess L is positive semidefinite, so its largest entry is on the diagonal."""
  pivot = jnp.min(jnp.abs(jnp.diagonal(factor.chol)))
  return jnp.maximum(1.0, jnp.max(jnp.diagonal(lin.hess)) / pivot**2)


# --------------------------------------------------------------- derivative


class _Theta(NamedTuple):
  """The differentiable inputs of the solution map (implicit_diff.solution_map)."""

  x: Any
  consts: Any  # (arrays g closes over, arrays G closes over)
  h: Any  # Polyhedral (zero cotangent: F does not read it)
  alpha: Any
  beta: Any


def _optimality(model, derivative):
  """F(theta; (y, p)) of (3.2) in theta, whose -(d_theta F)^T u is theta-bar:
  (grad_y L_{a,b}, G - a p) for (3.6); (grad_y L_{0,0}, G) for (3.14)."""

  def regularized(theta, sol):
    y, p = sol
    grad, _ = _lagrangian_grad(model, theta.x, theta.consts, y, p, theta.beta)
    return grad, model.G(theta.x, y, *theta.consts[1]) - theta.alpha * p

  def unregularized(theta, sol):
    y, p = sol
    grad, _ = _lagrangian_grad(model, theta.x, theta.consts, y, p, jnp.zeros((), y.dtype))
    return grad, model.G(theta.x, y, *theta.consts[1])

  return regularized if derivative == "regularized" else unregularized


def _regularized_cotangent(model, options, theta, y, p, states, dense_data, ct_y, ct_p):
  """u = B (B^T A B)^{-1} B^T (ct_y, ct_p) by the Schur complement of (3.6):

      (hess L + grad G^T P grad G / alpha) u_y = ct_y + grad G^T P ct_p / alpha,
      u_p = P (grad G u_y - ct_p) / alpha,

  with the Cholesky factor of the Newton matrix at the solution (dense), or
  by CG."""
  x, consts, h, alpha, beta = theta
  proj_ct_p = poly.project_dual(h, states, ct_p)
  if dense_data is not None:
    factor, lin = _dense_factor(model, theta, y, p, states, dense_data)
    u_y = _factor_solve(factor, ct_y + lin.jac.T @ proj_ct_p / alpha)
    return u_y, poly.project_dual(h, states, lin.jac @ u_y - ct_p) / alpha
  G_y = lambda yy: model.G(x, yy, *consts[1])
  _, vjp = jax.vjp(G_y, y)
  rhs = ct_y + vjp(proj_ct_p)[0] / alpha
  u_y = _matrix_free_solve(model, x, consts, y, p, beta, h, states, alpha, rhs, options)
  jvp = jax.jvp(G_y, (y,), (u_y,))[1]
  return u_y, poly.project_dual(h, states, jvp - ct_p) / alpha


def _unregularized_cotangent(model, theta, y, p, states, ct_y, ct_p):
  """u for (3.14): the saddle system of A with alpha = beta = 0, on K (dense)."""
  x, consts, h = theta.x, theta.consts, theta.h
  m, s = y.shape[0], p.shape[0]
  zero = jnp.zeros((), y.dtype)
  hess = _hessian_L(model, x, consts, y, p, zero, dense=True)
  jac = _jacobian_G(model, x, consts, y)
  proj = jax.vmap(lambda col: poly.project_dual(h, states, col), 1, 1)(jnp.eye(s, dtype=y.dtype))
  full_proj = jax.scipy.linalg.block_diag(jnp.eye(m, dtype=y.dtype), proj)
  a_matrix = jnp.block([[hess, jac.T], [jac, jnp.zeros((s, s), y.dtype)]])
  system = full_proj @ a_matrix @ full_proj + (jnp.eye(m + s, dtype=y.dtype) - full_proj)
  u = jnp.linalg.solve(system, full_proj @ jnp.concatenate([ct_y, ct_p]))
  return u[:m], u[m:]


def _solution(model, options, theta, y0):
  """(y, p, info), differentiable in theta by (3.6) or (3.14)."""

  def solve(theta, start):
    y, p, states, info, dense_data = _forward(
      model, theta.h, theta.x, theta.consts, start, theta.alpha, theta.beta, options
    )
    return (y, p, info), (y, p, states, dense_data)

  def adjoint(theta, saved, cotangent):
    y, p, states, dense_data = saved
    ct_y = jnp.asarray(cotangent[0], y.dtype)
    ct_p = jnp.asarray(cotangent[1], p.dtype)
    if options.derivative == "regularized":
      u = _regularized_cotangent(model, options, theta, y, p, states, dense_data, ct_y, ct_p)
    else:
      u = _unregularized_cotangent(model, theta, y, p, states, ct_y, ct_p)
    return implicit_diff.root_vjp(_optimality(model, options.derivative), theta, (y, p), u)

  return implicit_diff.solution_map(solve, adjoint, theta, y0)


# ------------------------------------------------------------------ public


def _check_options(tol, max_steps, derivative, linear_solver, dtype):
  validation.check_one_of("derivative", derivative, DERIVATIVES)
  validation.check_one_of("linear_solver", linear_solver, LINEAR_SOLVERS)
  validation.check_positive_int("max_steps", max_steps)
  if tol is None:
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
  validation.check_positive("tol", tol)
  return float(tol)


class _Prepared(NamedTuple):
  model: _Model
  theta: _Theta
  y0: Any  # flat
  unravel: Any  # flat -> the structure of y0
  options: _Options
  p_scale: Any  # p = p_scale * the multiplier of the solve (h's traced scale)


def _prepare(
  g,
  G,
  h,
  x,
  y0,
  alpha,
  beta,
  tol,
  max_steps,
  derivative,
  linear_solver,
  max_backtracks,
  cg_max_steps,
  method,
  warm_steps,
) -> _Prepared:
  h = poly.check_h("h", h)
  for name, fn in (("g", g), ("G", G)):
    if not callable(fn):
      raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")
  variables.check("x", x)
  variables.check("y0", y0)
  if variables.has_rest(y0):
    raise TypeError(
      "`y0` must hold floating-point arrays only (composite.solve has no "
      "leaves to carry along); keep integer or key leaves out of y."
    )
  for name, value in (("alpha", alpha), ("beta", beta)):
    validation.check_positive(name, value)
  y0_flat, unravel = ravel_pytree(y0)
  tol = _check_options(tol, max_steps, derivative, linear_solver, y0_flat.dtype)
  validation.check_one_of("method", method, METHODS)
  if method in ("ipm", "warm") and linear_solver == "cg":
    raise ValueError(
      f"`linear_solver='cg'` needs `method='newton'`: the interior-point "
      f"phase of method={method!r} forms dense m x m matrices."
    )
  validation.check_positive_int("warm_steps", warm_steps)
  validation.check_positive_int("max_backtracks", max_backtracks)
  validation.check_positive_int("cg_max_steps", cg_max_steps)
  options = _Options(
    tol, max_steps, derivative, linear_solver, max_backtracks, cg_max_steps, method, warm_steps
  )

  g_flat = lambda xx, yy: g(xx, unravel(yy))
  G_flat = lambda xx, yy: G(xx, unravel(yy))
  h, scale = h.unscaled()
  p_scale = 1.0
  if scale is not None:
    # h = s h_1 with h_1 positively homogeneous (`polyhedral.l1`, `hinge`):
    # e_alpha h(z) = e_{alpha s^2} h_1(s z), so the solve runs on (s G, alpha
    # s^2, h_1) and p = s p_1.  s then reaches the derivative through the
    # arrays G closes over and through alpha.
    scale = jnp.asarray(scale, y0_flat.dtype)
    G_unscaled = G_flat
    G_flat = lambda xx, yy: scale * G_unscaled(xx, yy)
    alpha = alpha * scale**2
    p_scale = scale  # type: ignore[assignment]
  validation.check_scalar_output("g", g_flat, x, y0_flat)
  try:
    out = jax.eval_shape(G_flat, x, y0_flat)
  except Exception as err:
    raise TypeError(f"`G` failed when called on (x, y0): {err}") from err
  if getattr(out, "shape", None) != (h.size,):
    raise ValueError(
      f"`G` must return a vector of size {h.size} to match `h`, got "
      f"an output of shape {getattr(out, 'shape', type(out).__name__)}."
    )

  g_conv, g_consts = implicit_diff.closure_convert(g_flat, x, y0_flat)
  G_conv, G_consts = implicit_diff.closure_convert(G_flat, x, y0_flat)
  dtype = y0_flat.dtype
  theta = _Theta(x, (g_consts, G_consts), h, jnp.asarray(alpha, dtype), jnp.asarray(beta, dtype))
  return _Prepared(
    _Model(g_conv, G_conv), theta, y0_flat, unravel, options, jnp.asarray(p_scale, dtype)
  )


def solve(
  g,
  G,
  h,
  x,
  y0,
  *,
  alpha,
  beta,
  tol=None,
  max_steps: int = 100,
  derivative: str = "regularized",
  linear_solver: str = "auto",
  max_backtracks: int = 40,
  cg_max_steps: int = 1000,
  method: str = "ipm",
  warm_steps: int = 10,
  throw: bool = False,
) -> CompositeSolution:
  """Solves the regularized lower level (3.1); differentiable in x by (3.6).

      Y_{alpha,beta}(x) = argmin_y g(x, y) + e_alpha h(G(x, y)) + beta/2 |y|^2,

  with p = (G - prox_{alpha h}(G)) / alpha its multiplier in (3.2).

  Args:
    g: g(x, y) -> scalar, convex and C^2 in y.
    G: G(x, y) -> (s,) array, each entry convex and C^2 in y.
    h: a `Polyhedral` on R^s (nondecreasing, epi-polyhedral).
    x: upper-level variable, any pytree of float arrays.
    y0: starting point; fixes the shape and dtype of y (an array or a pytree
      of float arrays).
    alpha: Moreau-envelope parameter, > 0 (traced values allowed).
    beta: Tikhonov parameter, > 0 (traced values allowed).
    tol: stop when the relative residual of (3.2) is below tol (default
      1e-10 in float64, 1e-5 in float32), or below the rounding floor
      10 eps |grad G|^T (|p| + r) where that is larger, r = (|G_b| + |c0_b|)
      / alpha on blocks of h with several active pieces, else 0 (dense mode;
      matrix-free, tol alone).  Floor and residual are taken at the same
      point.
    max_steps: Newton iterations at most (and interior-point iterations at
      most); MAX_STEPS when reached first.
    derivative: "regularized" for (3.6) (always well defined for alpha,
      beta > 0), or "unregularized" for (3.14) of Theorem 3.3 (valid where
      (SOSC) and the relative interior condition hold; dense saddle solve).
    linear_solver: "dense" (Cholesky of the m x m Newton matrix), "cg"
      (matrix-free conjugate gradients, `implicit_diff.cg`, relative
      tolerance eps^0.75) or "auto" (dense when m <= 2000).  Dense mode
      computes hess_yy L and grad_y G once per solve when they do not depend
      on (y, p) (g quadratic, G affine in y: read off the jaxprs), and the
      derivative reuses the forward pass's factor.
    max_backtracks: trials in the line search of each Newton step.
    cg_max_steps: iterations of CG when matrix-free.
    method: "ipm" (default): a primal-dual interior-point phase on the joint
      (y, w) problem of Section 5.1, then Newton on phi to polish (robust
      for small alpha, dense); "newton": Newton on phi from y0 only (cheap
      per step, matrix-free with linear_solver="cg", but it may need many
      steps when alpha is small and y0 is far: each line search stops at the
      first kink of e_alpha h it crosses); "warm": for y0 a warm start (the
      solution at a nearby x): Newton on phi from y0, and only where it
      stalls (two steps in a row that do not halve the residual, the last
      one without a change of active set, or
      ``warm_steps`` steps) the interior-point phase from its last iterate,
      then Newton again.  When y0's active set is right, a solve is one or
      two Newton steps.
    warm_steps: Newton steps of method="warm" before it falls back.
    throw: raise `bilevel_jax.SolverError` when ``info.status`` is not
      SUCCESS (see `bilevel_jax.Status`); default False (check the status).

  Returns:
    `CompositeSolution(y, p, info)`.  y and p are differentiable in x, in
    the arrays g and G close over, and in alpha and beta, by jax.grad /
    jax.jacrev (reverse mode; the custom rule implements (3.6)), and in
    the traced ``scale`` of `l1` and `hinge`.  The other data of h (slopes
    and offsets) and y0 get a zero cotangent: put a weight to differentiate
    into G or into ``scale``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)    # min (y - x)^2/2 s.t. y <= 0
    >>> G = lambda x, y: y
    >>> sol = composite.solve(g, G, composite.nonpositive(1), jnp.array(1.0),
    ...                       jnp.zeros(1), alpha=0.1, beta=0.1)
    >>> round(float(sol.y[0]), 6), int(sol.info.status)    # x / (1 + beta + 1/alpha)
    (0.09009, 0)
    >>> dy = jax.grad(lambda x: composite.solve(g, G, composite.nonpositive(1), x,
    ...                                         jnp.zeros(1), alpha=0.1, beta=0.1).y[0])
    >>> round(float(dy(1.0)), 6)
    0.09009
  """
  prep = _prepare(
    g,
    G,
    h,
    x,
    y0,
    alpha,
    beta,
    tol,
    max_steps,
    derivative,
    linear_solver,
    max_backtracks,
    cg_max_steps,
    method,
    warm_steps,
  )
  y, p, info = _solution(prep.model, prep.options, prep.theta, prep.y0)
  status_lib.raise_if_failed(info.status, throw=throw, where="composite.solve")
  return CompositeSolution(prep.unravel(y), prep.p_scale * p, info)


_SOLVE_KEYWORDS = tuple(
  name
  for name, param in inspect.signature(solve).parameters.items()
  if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("alpha", "beta", "throw")
)


def hypergradient(
  upper_fn,
  g,
  G,
  h,
  x,
  y0,
  *,
  alpha,
  beta,
  return_info: bool = False,
  throw: bool = False,
  **solve_kw,
):
  """phi(x) = upper_fn(x, Y_{alpha,beta}(x)) and its gradient by (3.6).

      grad phi(x) = grad_x F(x, y) + (d Y_{alpha,beta} / dx)^T grad_y F(x, y)

  Takes the keyword arguments of `solve`.  Returns ``(value, grad)``, or
  ``(value, grad, solution)`` with ``return_info=True`` (the
  `CompositeSolution` at x, whose ``info.status`` is the lower status);
  ``grad`` has the structure of ``x`` (None at leaves that are not floating
  point).
  ``throw``: raise `bilevel_jax.SolverError` when the lower solve did not
  succeed.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)
    >>> F = lambda x, y: y[0]                 # phi(x) = x / (1 + beta + 1/alpha), x > 0
    >>> value, grad = composite.hypergradient(F, g, lambda x, y: y, composite.nonpositive(1),
    ...                                       jnp.array(1.0), jnp.zeros(1), alpha=0.1,
    ...                                       beta=0.1)
    >>> round(float(value), 6), round(float(grad), 6)
    (0.09009, 0.09009)
  """
  if not callable(upper_fn):
    raise TypeError(f"`upper_fn` must be callable, got {type(upper_fn).__name__}.")
  validation.check_keywords("composite.solve", solve_kw, _SOLVE_KEYWORDS)
  variables.check("x", x)
  validation.check_scalar_output("upper_fn", upper_fn, x, y0)
  x_dyn, x_rest = variables.partition(x)

  def phi(xd):
    xx = variables.combine(xd, x_rest)
    sol = solve(g, G, h, xx, y0, alpha=alpha, beta=beta, **solve_kw)
    return upper_fn(xx, sol.y), sol

  (value, solution), grad = jax.value_and_grad(phi, has_aux=True)(x_dyn)
  status_lib.raise_if_failed(solution.info.status, throw=throw, where="composite.hypergradient")
  if return_info:
    return value, grad, solution
  return value, grad


def make_hypergradient(
  upper_fn: Callable, g: Callable, G: Callable, h, *, jit: bool = True, **kwargs
):
  """Builds ``fn(x, y0) -> (value, grad, solution)`` of `hypergradient` for
  `bilevel_jax.upper.optimize`: ``solution.info`` carries the lower status and
  residual, which the driver records every upper step; with ``warm_start=True``
  the driver passes the previous ``solution.y`` back as y0 (use
  ``method="warm"``).  The builder is `bilevel_jax._src.hypergradient.make`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import composite
    >>> g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)
    >>> fn = composite.make_hypergradient(lambda x, y: y[0], g, lambda x, y: y,
    ...                                   composite.nonpositive(1), alpha=0.1, beta=0.1)
    >>> value, grad, sol = fn(jnp.array(1.0), jnp.zeros(1))
    >>> round(float(grad), 6), int(sol.info.status)
    (0.09009, 0)
  """
  return hypergradient_lib.make(hypergradient, upper_fn, g, G, h, jit=jit, **kwargs)
