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

import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import validation
from bilevel_jax._src.implicit import linear
from bilevel_jax._src.implicit import minimize
from bilevel_jax._src.implicit.linear import LINEAR_SOLVERS
from bilevel_jax._src.implicit.minimize import LINESEARCH_FAILED
from bilevel_jax._src.implicit.minimize import MAX_STEPS
from bilevel_jax._src.implicit.minimize import NONFINITE
from bilevel_jax._src.implicit.minimize import SOLVERS
from bilevel_jax._src.implicit.minimize import SUCCESS

STATUS_MESSAGES = {
    SUCCESS: "converged: |grad_y f| below tol",
    MAX_STEPS: "max_steps reached before |grad_y f| fell below tol",
    NONFINITE: "non-finite value, gradient or iterate of the lower objective",
    LINESEARCH_FAILED: "the line search found no decrease; |grad_y f| above tol "
                       "(tol below what rounding allows?)",
}


class ImplicitInfo(NamedTuple):
  """Diagnostics of the lower solve (and, from `hypergradient`, of (2)).

  Attributes:
    steps: lower-solver iterations taken.
    value: f(x, y*) at the returned y*.
    grad_norm: ||grad_y f(x, y*)||_2, the quantity compared with ``tol``.
    status: SUCCESS, MAX_STEPS, NONFINITE or LINESEARCH_FAILED.
    linear_steps: CG iterations of the adjoint solve (2) (1 for the dense
      solve). Set by `hypergradient`; `solve` returns -1, because its
      adjoint solve runs later, in the backward pass.
    linear_residual: ||H v - y-bar||_2 / ||y-bar||_2 of (2); NaN from `solve`.
  """
  steps: Any
  value: Any
  grad_norm: Any
  status: Any
  linear_steps: Any
  linear_residual: Any


class ImplicitSolution(NamedTuple):
  """y = y*(x), differentiable in x by (2)-(3), and diagnostics."""
  y: Any
  info: ImplicitInfo


class _Options(NamedTuple):
  lower: minimize.Options
  linear_solver: str
  linear_tol: float
  linear_max_steps: int


class _Prepared(NamedTuple):
  fn: Callable      # closure-converted f(x, y_flat, *consts)
  consts: tuple
  y0: Any           # flat
  unravel: Callable
  options: _Options


# ---------------------------------------------------------------- the rule


def _lower(fn, options, x, consts, y0):
  """(y, info) of the lower solve; info's linear fields are placeholders."""
  y, steps, value, grad_norm, status = minimize.minimize(
      lambda yy: fn(x, yy, *consts), y0, options.lower)
  info = ImplicitInfo(steps, value, grad_norm, status, jnp.array(-1, jnp.int32),
                      jnp.full((), jnp.nan, y.dtype))
  return y, info


def _adjoint(fn, options, x, consts, y, ct_y):
  """Solves (2) and returns (x-bar, consts-bar, linear steps, residual) of (3)."""
  grad_y = lambda xx, yy, cc: jax.grad(fn, argnums=1)(xx, yy, *cc)
  ct_y = jnp.asarray(ct_y, y.dtype)
  if options.linear_solver == "dense":
    hessian = jax.jacfwd(lambda yy: grad_y(x, yy, consts))(y)
    v, steps, residual = linear.dense(hessian, ct_y)
  else:
    _, hvp = jax.linearize(lambda yy: grad_y(x, yy, consts), y)
    v, steps, residual = linear.cg(hvp, ct_y, tol=options.linear_tol,
                                   max_steps=options.linear_max_steps)
  _, vjp = jax.vjp(lambda xx, cc: grad_y(xx, y, cc), x, consts)
  ct_x, ct_consts = vjp(-v)
  return ct_x, ct_consts, steps, residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _solution(fn, options, x, consts, y0):
  return _lower(fn, options, x, consts, y0)


def _solution_fwd(fn, options, x, consts, y0):
  y, info = _lower(fn, options, x, consts, y0)
  return (y, info), (x, consts, y, y0)


def _solution_bwd(fn, options, residuals, cotangents):
  x, consts, y, y0 = residuals
  ct_y, _ = cotangents
  ct_x, ct_consts, _, _ = _adjoint(fn, options, x, consts, y, ct_y)
  return ct_x, ct_consts, jnp.zeros_like(y0)


_solution.defvjp(_solution_fwd, _solution_bwd)


# ------------------------------------------------------------ validation


def _prepare(lower_fn, x, y0, solver, tol, max_steps, linear_solver, linear_tol,
             linear_max_steps, stepsize, memory_size) -> _Prepared:
  if not callable(lower_fn):
    raise TypeError(f"`lower_fn` must be callable, got {type(lower_fn).__name__}.")
  validation.check_one_of("solver", solver, SOLVERS)
  validation.check_one_of("linear_solver", linear_solver, LINEAR_SOLVERS)
  validation.check_float_leaves("x", x)
  validation.check_float_leaves("y0", y0)
  max_steps = validation.check_positive_int("max_steps", max_steps)
  memory_size = validation.check_positive_int("memory_size", memory_size)
  y0_flat, unravel = ravel_pytree(y0)
  dtype = y0_flat.dtype
  for name, value in (("tol", tol), ("linear_tol", linear_tol)):
    if value is not None:
      if validation.concrete_value(value) is None or jnp.ndim(value) != 0:
        raise TypeError(f"`{name}` must be a Python float, got {value!r}.")
      validation.check_positive(name, value)
  tol = float(tol) if tol is not None else (1e-8 if dtype == jnp.float64 else 1e-4)
  linear_tol = float(linear_tol) if linear_tol is not None else (
      1e-10 if dtype == jnp.float64 else 1e-5)
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

  f_flat = lambda xx, yy: lower_fn(xx, unravel(yy))
  try:
    out = jax.eval_shape(f_flat, x, y0_flat)
  except Exception as err:  # re-raised with the arguments' names
    raise ValueError(f"`lower_fn` failed when called on (x, y0); does `y0` have the "
                     f"structure and shapes lower_fn expects for y? {err}") from err
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    raise ValueError(f"`lower_fn` must return a scalar, got an output of shape "
                     f"{getattr(out, 'shape', type(out).__name__)}.")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"`lower_fn` must return a floating-point scalar, got dtype {out.dtype}.")

  fn, consts = jax.closure_convert(f_flat, x, y0_flat)
  options = _Options(minimize.Options(solver, tol, max_steps, stepsize, memory_size),
                     linear_solver, linear_tol, linear_max_steps)
  return _Prepared(fn, tuple(consts), y0_flat, unravel, options)


# ------------------------------------------------------------------ public


def solve(lower_fn: Callable, x, y0, *, solver: str = "lbfgs", tol: Optional[float] = None,
          max_steps: int = 500, linear_solver: str = "cg",
          linear_tol: Optional[float] = None, linear_max_steps: Optional[int] = None,
          stepsize: Optional[float] = None, memory_size: int = 10) -> ImplicitSolution:
  """Minimizes y -> f(x, y); the minimizer is differentiable in x by (2)-(3).

  Args:
    lower_fn: f(x, y) -> scalar, smooth and strongly convex in y.
    x: upper variable, any pytree of float arrays.
    y0: starting point; fixes the structure, shapes and dtype of y (any
      pytree of float arrays).
    solver: "lbfgs" (L-BFGS with Armijo backtracking), "gd" (gradient
      descent: fixed ``stepsize``, or Armijo backtracking) or "newton"
      (dense Hessian, Armijo backtracking; small y only). See
      `bilevel_jax._src.implicit.minimize`.
    tol: stop when ||grad_y f(x, y)||_2 <= tol (an absolute tolerance, as
      jaxopt's; default 1e-8 in float64, 1e-4 in float32).
    max_steps: lower iterations at most (static).
    linear_solver: "cg" (conjugate gradients on Hessian-vector products) or
      "dense" (form the Hessian and solve by LU; small y only) for (2).
    linear_tol: CG stops when ||H v - y-bar|| <= linear_tol ||y-bar||
      (default 1e-10 in float64, 1e-5 in float32).
    linear_max_steps: CG iterations at most (default 10 times the size of y).
    stepsize: the fixed step of solver="gd" (for example 1 / L with L the
      Lipschitz constant of grad_y f); None for backtracking.
    memory_size: pairs kept by L-BFGS.

  Returns:
    `ImplicitSolution(y, info)`. ``y`` has the structure of ``y0`` and is
    differentiable in ``x`` and in arrays ``lower_fn`` closes over, by
    `jax.grad` / `jax.vjp` (reverse mode; y0 gets a zero cotangent). The
    derivative assumes ``y`` is the minimizer: check ``info.status``.

  Example:
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
  p = _prepare(lower_fn, x, y0, solver, tol, max_steps, linear_solver, linear_tol,
               linear_max_steps, stepsize, memory_size)
  # One program even when called eagerly (inlined under an outer jit).
  y, info = jax.jit(_solution, static_argnums=(0, 1))(p.fn, p.options, x, p.consts, p.y0)
  return ImplicitSolution(p.unravel(y), info)


def hypergradient(upper_fn: Callable, lower_fn: Callable, x, y0, *,
                  return_info: bool = False, **solve_kw):
  """phi(x) = F(x, y*(x)) and its gradient (4).

  Takes the keyword arguments of `solve`. The direct term grad_x F is
  included. Returns ``(value, grad)``, or ``(value, grad, solution)`` with
  ``return_info=True``, where ``solution.info`` also holds the steps and
  relative residual of the adjoint solve (2); ``grad`` has the structure of
  ``x``.

  Example:
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
  validation.check_scalar_output("upper_fn", upper_fn, x, y0)

  @jax.jit  # one program even when called eagerly (inlined under an outer jit)
  def run(x, consts, y0):
    y, info = _lower(p.fn, p.options, x, consts, y0)
    upper = lambda xx, yy: upper_fn(xx, p.unravel(yy))
    value, (grad_x, grad_y) = jax.value_and_grad(upper, argnums=(0, 1))(x, y)
    ct_x, _, steps, residual = _adjoint(p.fn, p.options, x, consts, y, grad_y)
    return value, jax.tree_util.tree_map(jnp.add, grad_x, ct_x), y, info, steps, residual

  value, grad, y, info, steps, residual = run(x, p.consts, p.y0)
  if not return_info:
    return value, grad
  info = info._replace(linear_steps=steps, linear_residual=residual)
  return value, grad, ImplicitSolution(p.unravel(y), info)


_SOLVE_DEFAULTS = {name: param.default for name, param in
                   inspect.signature(solve).parameters.items()
                   if param.kind is inspect.Parameter.KEYWORD_ONLY}


def _solve_kwargs(kwargs):
  unknown = sorted(set(kwargs) - set(_SOLVE_DEFAULTS))
  if unknown:
    raise TypeError(f"unknown keyword argument(s) {unknown}; `solve` takes "
                    f"{sorted(_SOLVE_DEFAULTS)}.")
  return {**_SOLVE_DEFAULTS, **kwargs}


def make_hypergradient(upper_fn: Callable, lower_fn: Callable, *, jit: bool = True,
                       **kwargs):
  """Builds the hypergradient function that `bilevel_jax.upper.optimize` takes.

  Returns ``fn(x, y0) -> (value, grad, y*)``; with ``warm_start=True`` the
  driver passes the previous y* back as y0, so each lower solve starts
  close. ``kwargs`` are those of `solve`.
  """
  _solve_kwargs(kwargs)

  def fn(x, y0):
    value, grad, solution = hypergradient(upper_fn, lower_fn, x, y0, return_info=True,
                                          **kwargs)
    return value, grad, solution.y

  return jax.jit(fn) if jit else fn
