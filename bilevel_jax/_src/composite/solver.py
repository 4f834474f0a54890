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
from bilevel_jax._src.composite import polyhedral as poly

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
METHODS = ("ipm", "newton")
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


class _Linearization(NamedTuple):
  """hess_yy L and grad_y G at one point, dense (matrices) or as products."""
  hess: Any   # (m, m) or None
  jac: Any    # (s, m) or None
  hvp: Any
  jvp: Any
  vjp: Any


def _linearize(model, x, consts, y, p, beta, options):
  m = y.shape[0]
  dense = options.linear_solver == "dense" or (
      options.linear_solver == "auto" and m <= DENSE_MAX)
  G_y = lambda yy: model.G(x, yy, *consts[1])
  _, vjp = jax.vjp(G_y, y)
  jvp = lambda v: jax.jvp(G_y, (y,), (v,))[1]
  if dense:
    hess = _hessian_L(model, x, consts, y, p, beta, dense=True)
    jac = _jacobian_G(model, x, consts, y)
    return _Linearization(hess, jac, lambda v: hess @ v, lambda v: jac @ v,
                          lambda u: jac.T @ u)
  hvp = _hessian_L(model, x, consts, y, p, beta, dense=False)
  return _Linearization(None, None, hvp, jvp, lambda u: vjp(u)[0])


def _schur_solve(lin, h, states, alpha, rhs, options):
  """Solves (hess L + grad G^T P grad G / alpha) u = rhs, dense or by CG."""
  if lin.hess is not None:
    proj_jac = jax.vmap(lambda col: poly.project_dual(h, states, col), 1, 1)(lin.jac)
    return jnp.linalg.solve(lin.hess + lin.jac.T @ proj_jac / alpha, rhs)

  def matvec(v):
    return lin.hvp(v) + lin.vjp(poly.project_dual(h, states, lin.jvp(v))) / alpha

  sol, _ = jax.scipy.sparse.linalg.cg(matvec, rhs, maxiter=options.cg_max_steps,
                                      tol=float(jnp.finfo(rhs.dtype).eps) ** 0.75)
  return sol


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


def _newton(model, h, x, consts, y0, alpha, beta, options):
  """Damped Newton on phi with model-minimizer directions (see above)."""
  eps = float(jnp.finfo(y0.dtype).eps)

  def cond(state):
    _, _, _, _, _, _, step, status, _ = state
    return (status < 0) & (step < options.max_steps)

  def body(state):
    y, phi, p, grad, states, scale, step, _, _ = state
    lin = _linearize(model, x, consts, y, p, beta, options)
    direction = _schur_solve(lin, h, states, alpha, -grad, options)
    slope = jnp.vdot(grad, direction)

    # Armijo backtracking; each trial is a full evaluation, so the accepted one
    # is reused (one traced evaluation inside the loop body).
    def ls_cond(ls):
      t, k, ev = ls
      slack = 10 * eps * (1 + jnp.abs(phi))
      accepted = jnp.isfinite(ev[0]) & (ev[0] <= phi + 1e-4 * t * slope + slack)
      return (k == 0) | ((~accepted) & (k <= options.max_backtracks))

    def ls_body(ls):
      t, k, _ = ls
      t = jnp.where(k == 0, t, 0.5 * t)
      return t, k + 1, _evaluate(model, h, x, consts, y + t * direction, alpha, beta)

    current = (phi, p, grad, states, scale)
    t, k, trial = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones((), y.dtype), 0, current))
    failed = k > options.max_backtracks
    y_new = jnp.where(failed, y, y + t * direction)
    phi_n, p_n, grad_n, states_n, scale_n = jax.tree_util.tree_map(
        lambda new, old: jnp.where(failed, old, new), trial, current)
    rel = jnp.max(jnp.abs(grad_n)) / scale_n
    finite = jnp.all(jnp.isfinite(y_new)) & jnp.isfinite(phi_n) & poly.prox_ok(states_n)
    status = jnp.where(~finite, NONFINITE,
                       jnp.where(rel <= jnp.maximum(options.tol, floor / scale_n), SUCCESS,
                                 jnp.where(failed, LINESEARCH_FAILED, -1)))
    return y_new, phi_n, p_n, grad_n, states_n, scale_n, step + 1, status, rel

  if options.method == "ipm":
    g_consts, G_consts = consts
    y_ipm, ipm_steps, _ = ipm.solve(
        lambda yy: model.g(x, yy, *g_consts), lambda yy: model.G(x, yy, *G_consts),
        lambda yy, pp: _hessian_L(model, x, consts, yy, pp, jnp.zeros((), yy.dtype), True),
        h, y0, alpha, beta, max_steps=options.max_steps)
    y0 = jnp.where(jnp.all(jnp.isfinite(y_ipm)), y_ipm, y0)
  else:
    ipm_steps = jnp.array(0, jnp.int32)
  phi0, p0, grad0, states0, scale0 = _evaluate(model, h, x, consts, y0, alpha, beta)
  # Rounding floor of grad phi: p = (G - w)/alpha carries eps |G| / alpha of
  # noise, which grad G^T amplifies; tol is raised to it (dense mode only).
  if y0.shape[0] <= DENSE_MAX:
    z0 = model.G(x, y0, *consts[1])
    jac0 = _jacobian_G(model, x, consts, y0)
    floor = 10 * eps * jnp.max(jnp.abs(jac0).T @ (1 + jnp.abs(z0))) / alpha
  else:
    floor = jnp.zeros((), y0.dtype)
  rel0 = jnp.max(jnp.abs(grad0)) / scale0
  status0 = jnp.where(rel0 <= jnp.maximum(options.tol, floor / scale0), SUCCESS, -1)
  init = (y0, phi0, p0, grad0, states0, scale0, jnp.array(0, jnp.int32), status0, rel0)
  y, phi, p, grad, states, scale, steps, status, _ = jax.lax.while_loop(cond, body, init)
  status = jnp.where(status < 0, MAX_STEPS, status)
  res = jnp.max(jnp.abs(grad))
  status = jnp.where(jnp.isfinite(res), status, NONFINITE)
  info = CompositeInfo(steps=steps, interior_steps=jnp.asarray(ipm_steps, jnp.int32),
                       residual=res, relative_residual=res / scale,
                       status=status.astype(jnp.int32),
                       ri_violated=poly.ri_violated(states),
                       num_active=poly.count_active(states).astype(jnp.int32),
                       objective=phi)
  return y, p, states, info


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
  y, p, _, info = _newton(model, h, x, consts, y0, alpha, beta, options)
  return y, p, info


def _solution_fwd(model, options, x, consts, h, alpha, beta, y0):
  y, p, states, info = _newton(model, h, x, consts, y0, alpha, beta, options)
  return (y, p, info), (x, consts, h, alpha, beta, y0, y, p, states)


def _regularized_cotangent(model, options, x, consts, h, alpha, beta, y, p, states, ct_y, ct_p):
  """u = B (B^T A B)^{-1} B^T (ct_y, ct_p) by the Schur complement of (3.6)."""
  lin = _linearize(model, x, consts, y, p, beta, options)
  proj_ct_p = poly.project_dual(h, states, ct_p)
  u_y = _schur_solve(lin, h, states, alpha, ct_y + lin.vjp(proj_ct_p) / alpha, options)
  u_p = poly.project_dual(h, states, lin.jvp(u_y) - ct_p) / alpha
  return u_y, u_p


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
  x, consts, h, alpha, beta, y0, y, p, states = residuals
  ct_y, ct_p, _ = cotangents
  ct_y = jnp.asarray(ct_y, y.dtype)
  ct_p = jnp.asarray(ct_p, p.dtype)
  if options.derivative == "regularized":
    u_y, u_p = _regularized_cotangent(model, options, x, consts, h, alpha, beta, y, p,
                                      states, ct_y, ct_p)
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
  if derivative not in DERIVATIVES:
    raise ValueError(f"`derivative` must be one of {DERIVATIVES}, got {derivative!r}.")
  if linear_solver not in LINEAR_SOLVERS:
    raise ValueError(f"`linear_solver` must be one of {LINEAR_SOLVERS}, got "
                     f"{linear_solver!r}.")
  validation.check_positive_int("max_steps", max_steps)
  if tol is None:
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
  validation.check_positive("tol", tol)
  return float(tol)


def solve(g, G, h, x, *, y0, alpha, beta, tol=None, max_steps: int = 100,
          derivative: str = "regularized", linear_solver: str = "auto",
          max_backtracks: int = 40, cg_max_steps: int = 1000,
          method: str = "ipm") -> CompositeSolution:
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
    linear_solver: "dense" (LU on the m x m Newton matrix), "cg"
      (matrix-free conjugate gradients) or "auto" (dense when m <= 2000).
    max_backtracks: halvings in the Armijo line search.
    cg_max_steps: iterations of CG when matrix-free.
    method: "ipm" (default): a primal-dual interior-point phase on the joint
      (y, w) problem of Section 5.1, then Newton on phi to polish (robust
      for small alpha, dense); "newton": Newton on phi from y0 only (cheap
      per step, matrix-free with linear_solver="cg", but it may need many
      steps when alpha is small and y0 is far: each line search stops at the
      first kink of e_alpha h it crosses).

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
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
  if method == "ipm" and linear_solver == "cg":
    raise ValueError("`linear_solver='cg'` needs `method='newton'`: the interior-point "
                     "phase forms dense m x m matrices.")
  options = _Options(tol, max_steps, derivative, linear_solver, max_backtracks, cg_max_steps,
                     method)

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
