"""Implicit differentiation of y*(x) = argmin_y f(x, y) for smooth, strongly
convex lower levels, and the hypergradient of phi(x) = F(x, y*(x)).

At the solution the optimality condition grad_y f(x, y*(x)) = 0 holds for
every x; differentiating it (implicit function theorem) gives

    hess_yy f(x, y*) dy*/dx = -d_x grad_y f(x, y*),                      (1)

which is solvable when hess_yy f is positive definite (strong convexity).
For a cotangent y-bar of y*, reverse mode therefore needs one linear solve,

    hess_yy f(x, y*) v = y-bar,                                          (2)
    x-bar = -(d_x grad_y f(x, y*))^T v,                                  (3)

a Hessian-vector-product solve by conjugate gradients (or a dense LU for
small y), and one vector-Jacobian product of grad_y f in x. With y-bar =
grad_y F(x, y*), the hypergradient is

    grad phi(x) = grad_x F(x, y*) - (d_x grad_y f(x, y*))^T v,           (4)

(Pedregosa, ICML 2016, eq. (3); Blondel et al., NeurIPS 2022, Section 2).
`solve` attaches (2)-(3) to y*(x) as a custom VJP (the solver's iterations
are never differentiated); `hypergradient` evaluates (4) directly, which
also lets it report how well (2) was solved. Arrays that ``lower_fn``
closes over get their cotangents from (3) too (`jax.closure_convert`).

y*(x) is only as accurate as the lower solve: an error e in y* gives an
O(|e|) error in (4), and (2) solved to relative residual r another O(r).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import hypergradient as hypergradient_lib
from bilevel_jax._src import implicit_diff
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import validation
from bilevel_jax._src import variables
from bilevel_jax._src.implicit import minimize
from bilevel_jax._src.implicit.minimize import SOLVERS
from bilevel_jax._src.implicit_diff import LINEAR_SOLVERS

# "factor": Newton's LU factors of hess_yy f(x, y*) (exact, solver="newton");
# "shine": the L-BFGS inverse estimate alone (an approximation, solver="lbfgs").
IMPLICIT_LINEAR_SOLVERS = LINEAR_SOLVERS + ("factor", "shine")
PRECONDITIONERS = (None, "lbfgs")


class ImplicitInfo(NamedTuple):
  """Diagnostics of the lower solve (and, from `hypergradient`, of (2)).

  Attributes:
    num_steps: lower-solver iterations taken.
    status: a `bilevel_jax.Status` code: the lower solve's SUCCESS, MAX_STEPS,
      NONFINITE or LINESEARCH_FAILED; NOT_CONVEX when it succeeded but a
      direction of zero or negative curvature of hess_yy f(x, y*) was found
      (``curvature`` <= 0: y* is a saddle point or a maximum, or the
      Hessian is singular, and (1) does not give the derivative of the
      argmin); from `hypergradient`, also NONFINITE when the adjoint solve
      (2) or the gradient is not finite and MAX_STEPS when CG stopped at
      ``linear_max_steps`` above ``linear_tol``.
    residual: ||grad_y f(x, y*)||_2, the quantity compared with ``tol``.
    value: f(x, y*) at the returned y*.
    linear_steps: CG iterations of the adjoint solve (2) (1 for the dense
      solve). Set by `hypergradient`; `solve` returns -1, because its
      adjoint solve runs later, in the backward pass.
    linear_residual: ||H v - y-bar||_2 / ||y-bar||_2 of (2); NaN from `solve`.
    curvature: the smallest Rayleigh quotient v' H v / v' v of
      H = hess_yy f(x, y*) found: along one fixed probe direction (`solve`;
      a saddle whose negative curvature avoids the probe goes unseen), and
      from `hypergradient` also along CG's directions (or the smallest
      eigenvalue with ``linear_solver="dense"``). Positive for a strongly
      convex f.
  """

  num_steps: Any
  status: Any
  residual: Any
  value: Any
  linear_steps: Any
  linear_residual: Any
  curvature: Any


class ImplicitSolution(NamedTuple):
  """y = y*(x), differentiable in x by (2)-(3), and diagnostics.

  ``adjoint`` is v of (2) from `hypergradient` (a tree like the
  floating-point leaves of y; pass it as the next call's ``v0``), None from
  `solve`, whose adjoint solve runs in the backward pass.
  """

  y: Any
  info: ImplicitInfo
  adjoint: Any = None


class _Options(NamedTuple):
  lower: minimize.Options
  linear_solver: str
  linear_tol: float
  linear_max_steps: int
  preconditioner: str | None = None


class _Prepared(NamedTuple):
  fn: Callable  # closure-converted f(x_dyn, y_flat, *consts)
  consts: tuple
  x: Any  # differentiable part of x (None at the other leaves)
  as_x: Callable  # x_dyn -> x
  y0: Any  # flat differentiable part of y0
  unravel: Callable  # flat vector -> y (with the non-differentiable leaves)
  unravel_dyn: Callable  # flat vector -> the differentiable part of y (None holes)
  options: _Options


# ---------------------------------------------------------------- the rule


def _lower(fn, options, x, consts, y0):
  """(y, info, inverse) of the lower solve; info's linear fields are
  placeholders; ``inverse`` is the solver's inverse-Hessian estimate at y
  (`minimize.apply_inverse`)."""
  y, steps, value, grad_norm, status, inverse = minimize.minimize(
    lambda yy: fn(x, yy, *consts), y0, options.lower
  )
  curvature = implicit_diff.probe_curvature(jax.grad(lambda yy: fn(x, yy, *consts)), y)
  status = jnp.where(
    (status == status_lib.SUCCESS) & (curvature <= 0), status_lib.NOT_CONVEX, status
  ).astype(jnp.int32)
  info = ImplicitInfo(
    steps,
    status,
    grad_norm,
    value,
    jnp.array(-1, jnp.int32),
    jnp.full((), jnp.nan, y.dtype),
    curvature,
  )
  return y, info, inverse


def _reuse_inverse(options, operator, y, b, inverse):
  """(2) by the lower solver's inverse estimate, without CG: Newton's LU
  factors ("factor", exact) or the L-BFGS two-loop (``"shine"``, an
  approximation). One Hessian-vector product measures the residual and the
  curvature along v."""
  v = minimize.apply_inverse(options.lower.solver, inverse, b)
  _, hv = jax.jvp(operator, (y,), (v,))
  b_norm = jnp.linalg.norm(b)
  residual = jnp.linalg.norm(hv - b) / jnp.where(b_norm > 0, b_norm, 1.0)
  v_norm2 = jnp.vdot(v, v)
  curvature = jnp.where(
    v_norm2 > 0, jnp.vdot(v, hv) / jnp.where(v_norm2 > 0, v_norm2, 1.0), jnp.inf
  )
  return v, jnp.array(1, jnp.int32), residual, curvature


def _adjoint(fn, options, x, consts, y, ct_y, inverse, v0=None):
  """Solves (2) (from ``v0`` with CG) and returns (x-bar, consts-bar, v,
  linear steps, residual, curvature) of (3)."""
  grad_y = lambda theta, yy: jax.grad(fn, argnums=1)(theta[0], yy, *theta[1])
  ct_y = jnp.asarray(ct_y, y.dtype)
  operator = lambda yy: grad_y((x, consts), yy)
  if options.linear_solver in ("factor", "shine"):
    v, steps, residual, curvature = _reuse_inverse(options, operator, y, ct_y, inverse)
  else:
    preconditioner = None
    if options.preconditioner == "lbfgs":
      preconditioner = lambda r: minimize.apply_inverse("lbfgs", inverse, r)
    v, steps, residual, curvature = implicit_diff.symmetric_solve(
      options.linear_solver,
      operator,
      y,
      ct_y,
      tol=options.linear_tol,
      max_steps=options.linear_max_steps,
      x0=v0,
      preconditioner=preconditioner,
    )
  ct_x, ct_consts = implicit_diff.root_vjp(grad_y, (x, consts), y, v)
  return ct_x, ct_consts, v, steps, residual, curvature


def _adjoint_status(info, options, grad, residual, curvature):
  """The status of `hypergradient`: the lower solve's, then NOT_CONVEX at
  curvature <= 0, NONFINITE for a non-finite adjoint solve, curvature or
  gradient, MAX_STEPS when CG stopped above ``linear_tol`` (INACCURATE for
  the approximation ``linear_solver="shine"`` and for "factor")."""
  status = info.status
  ok = status == status_lib.SUCCESS
  finite = jnp.isfinite(residual) & jnp.isfinite(curvature) & tree_ops.tree_all_finite(grad)
  above = status_lib.MAX_STEPS if options.linear_solver == "cg" else status_lib.INACCURATE
  for failed, code in (
    (curvature <= 0, status_lib.NOT_CONVEX),
    (~finite, status_lib.NONFINITE),
    (residual > options.linear_tol, above),
  ):
    status = jnp.where(ok & failed, code, status)
    ok = ok & ~failed
  return status.astype(jnp.int32)


def _solution(fn, options, x, consts, y0):
  """(y*, info), differentiable in (x, consts) by (2)-(3)."""

  def solve(theta, start):
    y, info, inverse = _lower(fn, options, theta[0], theta[1], start)
    return (y, info), (y, inverse)

  def adjoint(theta, saved, cotangent):
    y, inverse = saved
    ct_x, ct_consts, *_ = _adjoint(fn, options, theta[0], theta[1], y, cotangent[0], inverse)
    return ct_x, ct_consts

  return implicit_diff.solution_map(solve, adjoint, (x, consts), y0)


# ------------------------------------------------------------ validation


def _prepare(
  lower_fn,
  x,
  y0,
  solver,
  tol,
  max_steps,
  linear_solver,
  linear_tol,
  linear_max_steps,
  stepsize,
  memory_size,
  preconditioner,
) -> _Prepared:
  if not callable(lower_fn):
    raise TypeError(f"`lower_fn` must be callable, got {type(lower_fn).__name__}.")
  validation.check_one_of("solver", solver, SOLVERS)
  validation.check_one_of("linear_solver", linear_solver, IMPLICIT_LINEAR_SOLVERS)
  validation.check_one_of("preconditioner", preconditioner, PRECONDITIONERS)
  for name, value, needs in (
    ("linear_solver", linear_solver == "factor", "newton"),
    ("linear_solver", linear_solver == "shine", "lbfgs"),
    ("preconditioner", preconditioner == "lbfgs", "lbfgs"),
  ):
    if value and solver != needs:
      option = linear_solver if name == "linear_solver" else preconditioner
      raise ValueError(
        f"`{name}={option!r}` reuses solver={needs!r}'s state, got solver={solver!r}."
      )
  if preconditioner is not None and linear_solver != "cg":
    raise ValueError(
      f"`preconditioner` applies to linear_solver='cg', got linear_solver={linear_solver!r}."
    )
  variables.check("x", x)
  variables.check("y0", y0)
  max_steps = validation.check_positive_int("max_steps", max_steps)
  memory_size = validation.check_positive_int("memory_size", memory_size)
  x_dyn, x_rest = variables.partition(x)
  as_x = lambda xd: variables.combine(xd, x_rest)
  y0_dyn, y_rest = variables.partition(y0)
  y0_flat, unravel_dyn = ravel_pytree(y0_dyn)
  unravel = lambda yf: variables.combine(unravel_dyn(yf), y_rest)
  dtype = y0_flat.dtype
  for name, value in (("tol", tol), ("linear_tol", linear_tol)):
    if value is not None:
      if validation.concrete_value(value) is None or jnp.ndim(value) != 0:
        raise TypeError(f"`{name}` must be a Python float, got {value!r}.")
      validation.check_positive(name, value)
  tol = float(tol) if tol is not None else (1e-8 if dtype == jnp.float64 else 1e-4)
  linear_tol = (
    float(linear_tol) if linear_tol is not None else (1e-10 if dtype == jnp.float64 else 1e-5)
  )
  if linear_max_steps is None:
    linear_max_steps = 10 * y0_flat.size
  linear_max_steps = validation.check_positive_int("linear_max_steps", linear_max_steps)
  if stepsize is not None:
    if validation.concrete_value(stepsize) is None or jnp.ndim(stepsize) != 0:
      raise TypeError(f"`stepsize` must be a Python float, got {stepsize!r}.")
    validation.check_positive("stepsize", stepsize)
    if solver != "gd":
      raise ValueError(f"`stepsize` is used by solver='gd' only, got solver={solver!r}.")
    stepsize = float(stepsize)

  f_flat = lambda xd, yy: lower_fn(as_x(xd), unravel(yy))
  validation.check_scalar_output("lower_fn", f_flat, x_dyn, y0_flat)
  fn, consts = implicit_diff.closure_convert(f_flat, x_dyn, y0_flat)
  options = _Options(
    minimize.Options(solver, tol, max_steps, stepsize, memory_size),
    linear_solver,
    linear_tol,
    linear_max_steps,
    preconditioner,
  )
  return _Prepared(fn, consts, x_dyn, as_x, y0_flat, unravel, unravel_dyn, options)


# ------------------------------------------------------------------ public


def solve(
  lower_fn: Callable,
  x,
  y0,
  *,
  solver: str = "lbfgs",
  tol: float | None = None,
  max_steps: int = 500,
  linear_solver: str = "cg",
  linear_tol: float | None = None,
  linear_max_steps: int | None = None,
  stepsize: float | None = None,
  memory_size: int = 10,
  preconditioner: str | None = None,
  throw: bool = False,
) -> ImplicitSolution:
  """Minimizes y -> f(x, y); the minimizer is differentiable in x by (2)-(3).

  Args:
    lower_fn: f(x, y) -> scalar, smooth and strongly convex in y.
    x: upper variable: any pytree with floating-point leaves (an Equinox
      module too; its other leaves are carried along).
    y0: starting point; fixes the structure, shapes and dtype of y: any
      pytree with floating-point leaves, an Equinox module, or Flax NNX
      state (``nnx.split(model)[1]``). Only the floating-point leaves are
      solved for; integer, boolean and key leaves are carried along.
    solver: "lbfgs" (L-BFGS with Armijo backtracking), "gd" (gradient
      descent: fixed ``stepsize``, or Armijo backtracking) or "newton"
      (dense Hessian, Armijo backtracking; small y only). See
      `bilevel_jax._src.implicit.minimize`.
    tol: stop when ||grad_y f(x, y)||_2 <= tol (an absolute tolerance, as
      jaxopt's; default 1e-8 in float64, 1e-4 in float32).
    max_steps: lower iterations at most (static).
    linear_solver: the solve of (2): "cg" (conjugate gradients on
      Hessian-vector products), "dense" (form the Hessian and solve by LU;
      small y only), "factor" (solver="newton" only: the LU factors of
      hess_yy f(x, y*) that Newton formed for its last direction, no new
      Hessian; exact) or "shine" (solver="lbfgs" only: v = H_k y-bar with
      H_k the L-BFGS inverse estimate of the lower solve, no iteration:
      **an approximation**, SHINE of Ramzi et al., ICLR 2022; its relative
      residual ``info.linear_residual`` is measured by one Hessian-vector
      product and the status is INACCURATE above ``linear_tol``; `hypergradient`
      only, since `solve`'s backward pass has no status to report it).
    linear_tol: CG stops when ||H v - y-bar|| <= linear_tol ||y-bar||
      (default 1e-10 in float64, 1e-5 in float32).
    linear_max_steps: CG iterations at most (default 10 times the size of y).
    stepsize: the fixed step of solver="gd" (for example 1 / L with L the
      Lipschitz constant of grad_y f); None for backtracking.
    memory_size: pairs kept by L-BFGS.
    preconditioner: None, or "lbfgs" (solver="lbfgs", linear_solver="cg"):
      CG on (2) preconditioned by the L-BFGS inverse estimate H_k of the
      lower solve (two-loop recursion; SHINE, Ramzi et al., ICLR 2022,
      used as a preconditioner). Exact: CG still stops at ``linear_tol`` on
      the unpreconditioned residual; only its iteration count changes.
    throw: raise `bilevel_jax.SolverError` when ``info.status`` is not
      SUCCESS (see `bilevel_jax.Status`); default False (status only).

  Returns:
    `ImplicitSolution(y, info)` (``adjoint`` None). ``y`` has the structure of ``y0`` and is
    differentiable in ``x`` and in arrays ``lower_fn`` closes over, by
    `jax.grad` / `jax.vjp` (reverse mode; y0 gets a zero cotangent). The
    derivative assumes ``y`` is the minimizer: check ``info.status``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import implicit
    >>> f = lambda lam, y: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * lam * jnp.sum(y ** 2)
    >>> sol = implicit.solve(f, 1.0, jnp.zeros(3))     # y* = 1 / (1 + lam)
    >>> [round(float(v), 6) for v in sol.y], int(sol.info.status)
    ([0.5, 0.5, 0.5], 0)
    >>> y_first = lambda lam: implicit.solve(f, lam, jnp.zeros(3), solver="newton").y[0]
    >>> round(float(jax.grad(y_first)(1.0)), 6)               # -1 / (1 + lam)^2
    -0.25
  """
  if linear_solver == "shine":
    raise ValueError(
      "`linear_solver='shine'` is an approximation whose residual only "
      "`implicit.hypergradient` reports (info.linear_residual, INACCURATE); `solve`'s "
      "backward pass could not say so: use 'cg' (with preconditioner='lbfgs') here."
    )
  p = _prepare(
    lower_fn,
    x,
    y0,
    solver,
    tol,
    max_steps,
    linear_solver,
    linear_tol,
    linear_max_steps,
    stepsize,
    memory_size,
    preconditioner,
  )
  # One program even when called eagerly (inlined under an outer jit).
  y, info = jax.jit(_solution, static_argnums=(0, 1))(p.fn, p.options, p.x, p.consts, p.y0)
  status_lib.raise_if_failed(info.status, throw=throw, where="implicit.solve")
  return ImplicitSolution(p.unravel(y), info)


def hypergradient(
  upper_fn: Callable,
  lower_fn: Callable,
  x,
  y0,
  *,
  v0=None,
  return_info: bool = False,
  throw: bool = False,
  **solve_kw,
):
  """phi(x) = F(x, y*(x)) and its gradient (4).

  Takes the keyword arguments of `solve`. The direct term grad_x F is
  included. Returns ``(value, grad)``, or ``(value, grad, solution)`` with
  ``return_info=True``, where ``solution.info`` also holds the steps and
  relative residual of the adjoint solve (2) and ``solution.adjoint`` is
  its v; ``grad`` has the structure of ``x`` (``None`` at leaves that are
  not floating point). ``throw``: raise `bilevel_jax.SolverError` when the
  lower solve did not succeed.

  Warm starts across upper steps: ``y0`` = the previous ``solution.y``
  starts the lower solve close, and ``v0`` = the previous
  ``solution.adjoint`` (a tree like the floating-point leaves of ``y0``)
  starts CG on (2) close: CG then runs from r_0 = y-bar - H v0 to the same
  relative tolerance ||H v - y-bar|| <= linear_tol ||y-bar||, so the
  gradient is as accurate and, when x moved little, cheaper (one more
  Hessian-vector product, fewer iterations). `bilevel_jax.upper.make_step`
  carries both with ``warm_start=True, warm_start_adjoint=True``. Used by
  ``linear_solver="cg"`` only.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import implicit
    >>> f = lambda lam, y: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * lam * jnp.sum(y ** 2)
    >>> F = lambda lam, y: 0.5 * jnp.sum(y ** 2)      # phi = 1.5 / (1 + lam)^2
    >>> value, grad = implicit.hypergradient(F, f, 1.0, jnp.zeros(3), solver="newton")
    >>> round(float(value), 6), round(float(grad), 6)
    (0.375, -0.375)
  """
  if not callable(upper_fn):
    raise TypeError(f"`upper_fn` must be callable, got {type(upper_fn).__name__}.")
  p = _prepare(lower_fn, x, y0, **_solve_kwargs(solve_kw))
  upper = lambda xd, yy: upper_fn(p.as_x(xd), p.unravel(yy))
  validation.check_scalar_output("upper_fn", upper, p.x, p.y0)
  v0_flat = None if v0 is None else _flat_like("v0", v0, p.y0)

  @jax.jit  # one program even when called eagerly (inlined under an outer jit)
  def run(x, consts, y0, v0):
    y, info, inverse = _lower(p.fn, p.options, x, consts, y0)
    value, (grad_x, grad_y) = jax.value_and_grad(upper, argnums=(0, 1))(x, y)
    ct_x, _, v, steps, residual, curvature = _adjoint(
      p.fn, p.options, x, consts, y, grad_y, inverse, v0
    )
    grad = jax.tree_util.tree_map(jnp.add, grad_x, ct_x)
    curvature = jnp.fmin(info.curvature, curvature)
    status = _adjoint_status(info, p.options, grad, residual, curvature)
    status = jnp.where(
      (status == status_lib.SUCCESS) & ~jnp.isfinite(value), status_lib.NONFINITE, status
    ).astype(jnp.int32)
    info = info._replace(
      status=status, linear_steps=steps, linear_residual=residual, curvature=curvature
    )
    return value, grad, y, v, info

  value, grad, y, v, info = run(p.x, p.consts, p.y0, v0_flat)
  status_lib.raise_if_failed(info.status, throw=throw, where="implicit.hypergradient")
  if not return_info:
    return value, grad
  return value, grad, ImplicitSolution(p.unravel(y), info, p.unravel_dyn(v))


def _flat_like(name, tree, flat):
  """``tree`` (like the floating-point leaves of y) as a vector like ``flat``;
  a ValueError naming ``name`` when its size differs."""
  vector = ravel_pytree(variables.partition(tree)[0])[0]
  if vector.shape != flat.shape:
    raise ValueError(
      f"`{name}` must be like the floating-point leaves of y0 ({flat.size} numbers), "
      f"got {vector.size}."
    )
  return vector.astype(flat.dtype)


_SOLVE_DEFAULTS = {
  name: param.default
  for name, param in inspect.signature(solve).parameters.items()
  if param.kind is inspect.Parameter.KEYWORD_ONLY and name != "throw"
}


def _solve_kwargs(kwargs):
  validation.check_keywords("implicit.solve", kwargs, _SOLVE_DEFAULTS)
  return {**_SOLVE_DEFAULTS, **kwargs}


def make_hypergradient(upper_fn: Callable, lower_fn: Callable, *, jit: bool = True, **kwargs):
  """Builds ``fn(x, y0) -> (value, grad, solution)`` for `bilevel_jax.upper.optimize`.

  ``solution.info`` carries the lower status and residual, which the driver
  records every upper step; with ``warm_start=True`` the driver passes the
  previous y* back as y0, so each lower solve starts close. ``kwargs`` are
  those of `solve`; the builder is `bilevel_jax._src.hypergradient.make`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import implicit
    >>> f = lambda lam, y: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * lam * jnp.sum(y ** 2)
    >>> F = lambda lam, y: 0.5 * jnp.sum((y - 0.25) ** 2)
    >>> hg = implicit.make_hypergradient(F, f, solver="newton")
    >>> value, grad, sol = hg(1.0, jnp.zeros(2))     # y* = 1 / (1 + lam) = 0.5
    >>> round(float(grad), 4), int(sol.info.status)   # dF/dlam = -2 (y* - 1/4) y*^2
    (-0.125, 0)
  """
  _solve_kwargs({k: v for k, v in kwargs.items() if k != "throw"})
  return hypergradient_lib.make(hypergradient, upper_fn, lower_fn, jit=jit, **kwargs)
