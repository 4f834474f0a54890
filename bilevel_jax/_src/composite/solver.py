"""Doubly-regularized composite lower level and its implicit hypergradient.

Lower level (Solla & Royset, (1.2)):  min_y g(x, y) + h(G(x, y)), with g and
each G_i convex and C^2 in y and h nondecreasing epi-polyhedral (2.6).

Regularized problem (3.1):

    Y_{a,b}(x) = argmin_y  phi(y) = g(x, y) + e_a h(G(x, y)) + b/2 |y|^2,

a strongly convex C^1 problem (Proposition 3.1).  With w = prox_{a h}(G) and
p = (G - w) / a (Section 5.1), grad phi = grad_y g + grad_y G^T p + b y, and
(y, p) solves (3.2).  We minimize phi by a damped semismooth Newton method:
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

Derivative (3.6), as a custom VJP (the solver's iterations are never
differentiated).  For a cotangent c = (c_y, c_p), u = B (B^T A B)^{-1} B^T c is

    (hess L + grad G^T P grad G / a) u_y = c_y + grad G^T P c_p / a,
    u_p = P (grad G u_y - c_p) / a,

and x-bar = -d/dx [grad_y L_{a,b}(x, y, p); G(x, y)]^T u at fixed (y, p);
a-bar = <p, u_p>, b-bar = -<y, u_y>.  The unregularized formula (3.14)
(Theorem 3.3, for problems satisfying (SOSC)) solves the saddle system with
a = b = 0 instead.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import validation
from bilevel_jax._src.composite import ipm
from bilevel_jax._src.composite import linalg
from bilevel_jax._src.composite import polyhedral as poly
from bilevel_jax._src.composite import structure

SUCCESS = 0
MAX_STEPS = 1
NONFINITE = 2
LINESEARCH_FAILED = 3
STATUS_MESSAGES = {
    SUCCESS: "converged: residual of (3.2) below tol",
    MAX_STEPS: "max_steps reached before the residual fell below tol",
    NONFINITE: "non-finite iterate, residual or prox (check g, G and alpha)",
    LINESEARCH_FAILED: "the line search found no decrease; residual above tol",
}
DERIVATIVES = ("regularized", "unregularized")
LINEAR_SOLVERS = ("auto", "dense", "cg")
METHODS = ("ipm", "newton", "warm")
DENSE_MAX = 2000


class CompositeInfo(NamedTuple):
  """Diagnostics of `solve`.

  Attributes:
    steps: Newton iterations on phi taken (after the interior-point phase).
    interior_steps: interior-point iterations (method="ipm"), else 0.
    residual: |grad_y g + grad_y G^T p + beta y|_inf, the residual of (3.2)
      (its second line holds exactly: p = (G - w)/alpha with w the exact prox).
    relative_residual: residual / (1 + |grad_y g|_inf + beta |y|_inf), the
      quantity compared with ``tol``.
    status: SUCCESS, MAX_STEPS, NONFINITE or LINESEARCH_FAILED.
    ri_violated: True when the relative interior condition of Theorem 3.2
      could not be certified at the solution (an active piece with a zero
      multiplier); the derivative then uses the active set the solver found.
    num_active: number of active pieces and constraints of h at G - alpha p.
    objective: phi(y) of (3.1) at the returned y.
  """
  steps: Any
  interior_steps: Any
  residual: Any
  relative_residual: Any
  status: Any
  ri_violated: Any
  num_active: Any
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
    return model.g(x, yy, *g_consts) + jnp.vdot(model.G(x, yy, *G_consts), p) \
        + 0.5 * beta * jnp.vdot(yy, yy)

  if dense:
    return jax.hessian(lag)(y)
  grad = jax.grad(lag)
  return lambda v: jax.jvp(grad, (y,), (v,))[1]


# ---------------------------------------------------- dense linear algebra


class _Structure(NamedTuple):
  """Static: hess_yy L independent of (y, p); grad_y G independent of y."""
  hess_const: bool
  jac_const: bool


def _structure(model, x, consts, y, p, dense) -> _Structure:
  if not dense:
    return _Structure(False, False)
  zero = jnp.zeros((), y.dtype)
  hess = lambda xx, cc, yy, pp: _hessian_L(model, xx, cc, yy, pp, zero, True)
  jac = lambda xx, cc, yy: _jacobian_G(model, xx, cc, yy)
  return _Structure(not structure.depends_on(hess, (x, consts, y, p), (2, 3)),
                    not structure.depends_on(jac, (x, consts, y), (2,)))


class _Lin(NamedTuple):
  """Dense hess_yy L (with beta I) and grad_y G; ``have`` says whether the
  constant parts are already computed (see _Structure)."""
  hess: Any
  jac: Any
  have: Any


def _empty_lin(y, s):
  m = y.shape[0]
  return _Lin(jnp.zeros((m, m), y.dtype), jnp.zeros((s, m), y.dtype), jnp.array(False))


def _update_lin(model, x, consts, y, p, beta, struct, lin):
  """hess and jac at (y, p): constant parts computed once, then reused."""
  def hess_at():
    return _hessian_L(model, x, consts, y, p, beta, dense=True)

  def jac_at():
    return _jacobian_G(model, x, consts, y)

  if struct.hess_const and struct.jac_const:
    hess, jac = linalg.maybe(~lin.have, lambda: (hess_at(), jac_at()), (lin.hess, lin.jac))
  else:
    hess = linalg.maybe(~lin.have, hess_at, lin.hess) if struct.hess_const else hess_at()
    jac = linalg.maybe(~lin.have, jac_at, lin.jac) if struct.jac_const else jac_at()
  return _Lin(hess, jac, jnp.array(True))


def _gauss_newton_term(h, states, jac):
  """grad G^T P grad G with P the block-diagonal projector onto K_{h*}."""
  out = jnp.zeros((jac.shape[1], jac.shape[1]), jac.dtype)
  for g, st in zip(h.groups, states):
    jb = jac[g.index]                                           # (nb, k, m)
    pj = jnp.einsum("bkl,blm->bkm", st.projector.astype(jac.dtype), jb)
    out = out + jnp.einsum("bkm,bkn->mn", jb, pj)
  return out


class _Factor(NamedTuple):
  """The Cholesky factor of the Newton matrix M = hess L + grad G^T P grad G /
  alpha, and the active pieces P was built from."""
  chol: Any
  active: Any


def _factor(h, states, lin, alpha):
  matrix = lin.hess + _gauss_newton_term(h, states, lin.jac) / alpha
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

  sol, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, maxiter=options.cg_max_steps,
                                      tol=float(jnp.finfo(rhs.dtype).eps) ** 0.75)
  return sol


def _dense(options, m) -> bool:
  return options.linear_solver == "dense" or (
      options.linear_solver == "auto" and m <= DENSE_MAX)


# ------------------------------------------------------------ forward solve


def _evaluate(model, h, x, consts, y, alpha, beta):
  """phi(y), p, grad phi and the prox states at y."""
  g_consts, G_consts = consts
  z = model.G(x, y, *G_consts)
  w, states = poly.prox(h, z, alpha)
  p = (z - w) / alpha
  envelope = poly.max_part(h, w) + jnp.vdot(z - w, z - w) / (2 * alpha)
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
  status: Any       # < 0 while running; STALLED: the warm phase gave up
  rel: Any
  slow: Any         # consecutive steps that did not halve rel
  floor: Any        # rounding floor of the residual (from grad G)
  lin: _Lin
  factor: Any       # _Factor of the last step (dense), or None


STALLED = -2


def _rounding_floor(model, x, consts, y, jac, alpha):
  """10 eps |grad G|^T (1 + |G|) / alpha: p = (G - w)/alpha carries eps |G| /
  alpha of noise, which grad G^T amplifies; tol is raised to it."""
  eps = float(jnp.finfo(y.dtype).eps)
  z = model.G(x, y, *consts[1])
  return 10 * eps * jnp.max(jnp.abs(jac).T @ (1 + jnp.abs(z))) / alpha


def _newton_init(model, h, x, consts, y0, alpha, beta, options, lin, factor, floor):
  phi, p, grad, states, scale = _evaluate(model, h, x, consts, y0, alpha, beta)
  rel = jnp.max(jnp.abs(grad)) / scale
  status = jnp.where(rel <= jnp.maximum(options.tol, floor / scale), SUCCESS, -1)
  return _Newton(y0, phi, p, grad, states, scale, jnp.array(0, jnp.int32), status, rel,
                 jnp.array(0, jnp.int32), floor, lin, factor)


def _newton_loop(model, h, x, consts, alpha, beta, options, struct, init, *, max_steps,
                 warm: bool):
  """Damped Newton on phi with model-minimizer directions (see above).

  With ``warm``, the loop also stops (status STALLED) when a step fails to
  halve the relative residual twice in a row, or after ``max_steps`` steps:
  the active set of the warm start is then too far off for Newton, whose line
  searches stop at the first kink of e_alpha h, and the caller switches to
  the interior-point method.
  """
  eps = float(jnp.finfo(init.y.dtype).eps)
  dense = init.factor is not None

  def cond(st):
    return (st.status < 0) & (st.status != STALLED) & (st.step < max_steps)

  def body(st):
    if dense:
      lin = _update_lin(model, x, consts, st.y, st.p, beta, struct, st.lin)
      factor = _factor(h, st.states, lin, alpha)
      direction = _factor_solve(factor, -st.grad)
      floor = _rounding_floor(model, x, consts, st.y, lin.jac, alpha)
    else:
      lin, factor, floor = st.lin, None, st.floor
      direction = _matrix_free_solve(model, x, consts, st.y, st.p, beta, h, st.states, alpha,
                                     -st.grad, options)
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
        ls_cond, ls_body, (one, 0, current, zero, one, slope, -one, jnp.array(False)))
    failed = ~accepted
    y_new = jnp.where(failed, st.y, st.y + t * direction)
    phi_n, p_n, grad_n, states_n, scale_n = jax.tree_util.tree_map(
        lambda new, old: jnp.where(failed, old, new), trial, current)
    rel = jnp.max(jnp.abs(grad_n)) / scale_n
    finite = jnp.all(jnp.isfinite(y_new)) & jnp.isfinite(phi_n) & poly.prox_ok(states_n)
    status = jnp.where(~finite, NONFINITE,
                       jnp.where(rel <= jnp.maximum(options.tol, floor / scale_n), SUCCESS,
                                 jnp.where(failed, LINESEARCH_FAILED, -1)))
    slow = jnp.where(rel > 0.5 * st.rel, st.slow + 1, 0)
    if warm:
      stalled = (slow >= 2) | (st.step + 1 >= max_steps)
      status = jnp.where((status < 0) & stalled, STALLED, status)
    return _Newton(y_new, phi_n, p_n, grad_n, states_n, scale_n, st.step + 1, status, rel,
                   slow, floor, lin, factor)

  return jax.lax.while_loop(cond, body, init)


def _placeholder_factor(y0, h):
  m = y0.shape[0]
  zeros = jnp.zeros((m, m), y0.dtype)
  active = tuple(jnp.zeros(g.a.shape[:1] + (g.a.shape[1] + g.b.shape[1],), bool)
                 for g in h.groups)
  return _Factor(zeros, active)


def _ipm_phase(model, h, x, consts, y, alpha, beta, options, struct, lin, active):
  """The interior-point method from y where ``active``; (y, steps, lin)."""
  g_consts, G_consts = consts
  p0 = jnp.zeros((h.size,), y.dtype)
  if struct.hess_const or struct.jac_const:
    lin = linalg.maybe(active & ~lin.have, lambda: _update_lin(model, x, consts, y, p0, beta,
                                                               struct, lin), lin)

  def lin_fn(yy, pp):
    hess = lin.hess if struct.hess_const else _hessian_L(model, x, consts, yy, pp, beta, True)
    jac = lin.jac if struct.jac_const else _jacobian_G(model, x, consts, yy)
    return hess, jac

  y_ipm, steps, _ = ipm.solve(
      lambda yy: model.g(x, yy, *g_consts), lambda yy: model.G(x, yy, *G_consts), lin_fn,
      h, y, alpha, beta, max_steps=options.max_steps, active=active)
  y_ipm = jnp.where(active & jnp.all(jnp.isfinite(y_ipm)), y_ipm, y)
  return y_ipm, jnp.asarray(steps, jnp.int32), lin


def _forward(model, h, x, consts, y0, alpha, beta, options, need_factor: bool):
  """The solve of (3.1): (y, p, prox states, info, (factor, jac) or None).

  method "ipm": interior point, then Newton on phi.  "newton": Newton only.
  "warm": Newton from y0 for at most warm_steps steps; where it stalls, the
  interior point from its last iterate, then Newton again.  With
  ``need_factor`` (the forward pass of the derivative, dense mode) the
  Cholesky factor of the Newton matrix at the solution is returned too: the
  last step's when the Hessian and grad G are constant and the active set did
  not change since, else a new one.
  """
  m = y0.shape[0]
  dense = _dense(options, m)
  struct = _structure(model, x, consts, y0, jnp.zeros((h.size,), y0.dtype), dense)
  lin = _empty_lin(y0, h.size)
  factor = _placeholder_factor(y0, h) if dense else None
  floor = jnp.zeros((), y0.dtype)
  init = functools.partial(_newton_init, model, h, x, consts)
  loop = functools.partial(_newton_loop, model, h, x, consts, alpha, beta, options, struct)
  ipm_steps = jnp.array(0, jnp.int32)
  if options.method == "warm":
    st = loop(init(y0, alpha, beta, options, lin, factor, floor),
              max_steps=options.warm_steps, warm=True)
    need_ipm = st.status != SUCCESS
    y_start = jnp.where(jnp.all(jnp.isfinite(st.y)), st.y, y0)
    y_ipm, ipm_steps, lin = _ipm_phase(model, h, x, consts, y_start, alpha, beta, options,
                                       struct, st.lin, need_ipm)
    first = st._replace(lin=lin, step=jnp.array(0, jnp.int32))
    start = linalg.maybe(need_ipm, lambda: init(y_ipm, alpha, beta, options, lin, st.factor,
                                                st.floor), first)
    warm_steps = st.step
  else:
    y_start = y0
    if options.method == "ipm":
      y_start, ipm_steps, lin = _ipm_phase(model, h, x, consts, y0, alpha, beta, options,
                                           struct, lin, jnp.array(True))
    start = init(y_start, alpha, beta, options, lin, factor, floor)
    warm_steps = jnp.array(0, jnp.int32)
  st = loop(start, max_steps=options.max_steps, warm=False)
  steps = warm_steps + st.step
  status = jnp.where(st.status < 0, MAX_STEPS, st.status)
  res = jnp.max(jnp.abs(st.grad))
  status = jnp.where(jnp.isfinite(res), status, NONFINITE)
  info = CompositeInfo(steps=steps, interior_steps=ipm_steps,
                       residual=res, relative_residual=res / st.scale,
                       status=status.astype(jnp.int32),
                       ri_violated=poly.ri_violated(st.states),
                       num_active=poly.count_active(st.states).astype(jnp.int32),
                       objective=st.phi)
  dense_data = None
  if need_factor and dense:
    same = jnp.array(struct.hess_const and struct.jac_const) & (steps > 0)
    for old, new in zip(st.factor.active, st.states):
      same = same & jnp.all(old == new.active)

    def refactor():
      lin_y = _update_lin(model, x, consts, st.y, st.p, beta, struct, st.lin)
      return _factor(h, st.states, lin_y, alpha), lin_y.jac

    dense_data = linalg.maybe(~same, refactor, (st.factor, st.lin.jac))
  return st.y, st.p, st.states, info, dense_data


# --------------------------------------------------------------- derivative


def _float0_like(tree):
  def zero(leaf):
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)
  return jax.tree_util.tree_map(zero, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solution(model, options, x, consts, h, alpha, beta, y0):
  y, p, _, info, _ = _forward(model, h, x, consts, y0, alpha, beta, options, False)
  return y, p, info


def _solution_fwd(model, options, x, consts, h, alpha, beta, y0):
  y, p, states, info, dense_data = _forward(model, h, x, consts, y0, alpha, beta, options,
                                            options.derivative == "regularized")
  return (y, p, info), (x, consts, h, alpha, beta, y0, y, p, states, dense_data)


def _regularized_cotangent(model, options, x, consts, h, alpha, beta, y, p, states,
                           dense_data, ct_y, ct_p):
  """u = B (B^T A B)^{-1} B^T (ct_y, ct_p) by the Schur complement of (3.6):

      (hess L + grad G^T P grad G / alpha) u_y = ct_y + grad G^T P ct_p / alpha,
      u_p = P (grad G u_y - ct_p) / alpha,

  with the Cholesky factor of the forward pass (dense), or by CG."""
  proj_ct_p = poly.project_dual(h, states, ct_p)
  if dense_data is not None:
    factor, jac = dense_data
    u_y = _factor_solve(factor, ct_y + jac.T @ proj_ct_p / alpha)
    return u_y, poly.project_dual(h, states, jac @ u_y - ct_p) / alpha
  G_y = lambda yy: model.G(x, yy, *consts[1])
  _, vjp = jax.vjp(G_y, y)
  rhs = ct_y + vjp(proj_ct_p)[0] / alpha
  u_y = _matrix_free_solve(model, x, consts, y, p, beta, h, states, alpha, rhs, options)
  jvp = jax.jvp(G_y, (y,), (u_y,))[1]
  return u_y, poly.project_dual(h, states, jvp - ct_p) / alpha


def _unregularized_cotangent(model, x, consts, h, y, p, states, ct_y, ct_p):
  """u for (3.14): the saddle system of A with alpha = beta = 0, on K (dense)."""
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


def _solution_bwd(model, options, residuals, cotangents):
  x, consts, h, alpha, beta, y0, y, p, states, dense_data = residuals
  ct_y, ct_p, _ = cotangents
  ct_y = jnp.asarray(ct_y, y.dtype)
  ct_p = jnp.asarray(ct_p, p.dtype)
  if options.derivative == "regularized":
    u_y, u_p = _regularized_cotangent(model, options, x, consts, h, alpha, beta, y, p,
                                      states, dense_data, ct_y, ct_p)
    ct_alpha = jnp.vdot(p, u_p).astype(jnp.result_type(alpha))
    ct_beta = -jnp.vdot(y, u_y).astype(jnp.result_type(beta))
    beta_used = beta
  else:
    u_y, u_p = _unregularized_cotangent(model, x, consts, h, y, p, states, ct_y, ct_p)
    ct_alpha = jnp.zeros((), jnp.result_type(alpha))
    ct_beta = jnp.zeros((), jnp.result_type(beta))
    beta_used = jnp.zeros((), y.dtype)

  def optimality(xx, cc):
    grad, _ = _lagrangian_grad(model, xx, cc, y, p, beta_used)
    return grad, model.G(xx, y, *cc[1])

  _, vjp = jax.vjp(optimality, x, consts)
  ct_x, ct_consts = vjp((-u_y, -u_p))
  return (ct_x, ct_consts, _float0_like(h), ct_alpha, ct_beta,
          jnp.zeros_like(y0))


_solution.defvjp(_solution_fwd, _solution_bwd)


# ------------------------------------------------------------------ public


def _check_options(tol, max_steps, derivative, linear_solver, dtype):
  validation.check_one_of("derivative", derivative, DERIVATIVES)
  validation.check_one_of("linear_solver", linear_solver, LINEAR_SOLVERS)
  validation.check_positive_int("max_steps", max_steps)
  if tol is None:
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
  validation.check_positive("tol", tol)
  return float(tol)


def solve(g, G, h, x, *, y0, alpha, beta, tol=None, max_steps: int = 100,
          derivative: str = "regularized", linear_solver: str = "auto",
          max_backtracks: int = 40, cg_max_steps: int = 1000,
          method: str = "ipm", warm_steps: int = 10) -> CompositeSolution:
  """Solves the regularized lower level (3.1); differentiable in x by (3.6).

  Args:
    g: g(x, y) -> scalar, convex and C^2 in y.
    G: G(x, y) -> (s,) array, each entry convex and C^2 in y.
    h: a `Polyhedral` on R^s (nondecreasing, epi-polyhedral).
    x: upper-level variable, any pytree of float arrays.
    y0: starting point; fixes the shape and dtype of y (an array or pytree).
    alpha: Moreau-envelope parameter, > 0 (traced values allowed).
    beta: Tikhonov parameter, > 0 (traced values allowed).
    tol: stop when the relative residual of (3.2) is below tol (default
      1e-10 in float64, 1e-5 in float32), or below the rounding floor
      10 eps |grad G|^T (1 + |G|) / alpha where that is larger.
    max_steps: Newton iterations at most.
    derivative: "regularized" for (3.6) (always well defined for alpha,
      beta > 0), or "unregularized" for (3.14) of Theorem 3.3 (valid where
      (SOSC) and the relative interior condition hold; dense saddle solve).
    linear_solver: "dense" (Cholesky of the m x m Newton matrix, LU if that
      fails), "cg" (matrix-free conjugate gradients) or "auto" (dense when
      m <= 2000).  Dense mode computes hess_yy L and grad_y G once per solve
      when they do not depend on (y, p) (g quadratic, G affine in y: read
      off the jaxprs), and the derivative reuses the forward pass's factor.
    max_backtracks: halvings in the Armijo line search.
    cg_max_steps: iterations of CG when matrix-free.
    method: "ipm" (default): a primal-dual interior-point phase on the joint
      (y, w) problem of Section 5.1, then Newton on phi to polish (robust
      for small alpha, dense); "newton": Newton on phi from y0 only (cheap
      per step, matrix-free with linear_solver="cg", but it may need many
      steps when alpha is small and y0 is far: each line search stops at the
      first kink of e_alpha h it crosses); "warm": for y0 a warm start (the
      solution at a nearby x): Newton on phi from y0, and only where it
      stalls (two steps in a row that do not halve the residual, or
      ``warm_steps`` steps) the interior-point phase from its last iterate,
      then Newton again.  When y0's active set is right, a solve is one or
      two Newton steps.
    warm_steps: Newton steps of method="warm" before it falls back.

  Returns:
    CompositeSolution(y, p, info).  y and p are differentiable in x, in the
    data g and G close over, and in alpha and beta, by jax.grad / jax.jacrev
    (reverse mode; the custom rule implements (3.6)).  The data of h get a
    zero cotangent.
  """
  h = poly.check_h("h", h)
  for name, value in (("alpha", alpha), ("beta", beta)):
    validation.check_positive(name, value)
  y0_flat, unravel = ravel_pytree(y0)
  if not jnp.issubdtype(y0_flat.dtype, jnp.floating):
    raise TypeError(f"`y0` must hold floating-point arrays, got dtype {y0_flat.dtype}.")
  tol = _check_options(tol, max_steps, derivative, linear_solver, y0_flat.dtype)
  validation.check_one_of("method", method, METHODS)
  if method in ("ipm", "warm") and linear_solver == "cg":
    raise ValueError(f"`linear_solver='cg'` needs `method='newton'`: the interior-point "
                     f"phase of method={method!r} forms dense m x m matrices.")
  validation.check_positive_int("warm_steps", warm_steps)
  options = _Options(tol, max_steps, derivative, linear_solver, max_backtracks, cg_max_steps,
                     method, warm_steps)

  g_flat = lambda xx, yy: g(xx, unravel(yy))
  G_flat = lambda xx, yy: G(xx, unravel(yy))
  validation.check_scalar_output("g", g_flat, x, y0_flat)
  try:
    out = jax.eval_shape(G_flat, x, y0_flat)
  except Exception as err:
    raise TypeError(f"`G` failed when called on (x, y0): {err}") from err
  if getattr(out, "shape", None) != (h.size,):
    raise ValueError(f"`G` must return a vector of size {h.size} to match `h`, got "
                     f"an output of shape {getattr(out, 'shape', type(out).__name__)}.")

  g_conv, g_consts = jax.closure_convert(g_flat, x, y0_flat)
  G_conv, G_consts = jax.closure_convert(G_flat, x, y0_flat)
  model = _Model(g_conv, G_conv)
  dtype = y0_flat.dtype
  alpha = jnp.asarray(alpha, dtype)
  beta = jnp.asarray(beta, dtype)
  y, p, info = _solution(model, options, x, (tuple(g_consts), tuple(G_consts)), h,
                         alpha, beta, y0_flat)
  return CompositeSolution(unravel(y), p, info)


def make_hypergradient(upper_fn, g, G, h, *, alpha, beta, jit: bool = True, **kwargs):
  """The hypergradient of x -> upper_fn(x, Y_{alpha,beta}(x)) for the Optax
  driver `bilevel_jax.upper.optimize`.

  Returns ``fn(x, y0) -> (value, grad, y)``; with ``warm_start=True`` the
  driver passes the previous y back as y0.  The gradient chains
  grad_x upper_fn with (3.6); ``kwargs`` are those of `solve`.
  """
  def value(x, y0):
    sol = solve(g, G, h, x, y0=y0, alpha=alpha, beta=beta, **kwargs)
    return upper_fn(x, sol.y), sol.y

  def fn(x, y0):
    (val, y), grad = jax.value_and_grad(value, has_aux=True)(x, y0)
    return val, grad, y

  return jax.jit(fn) if jit else fn
