"""Lower-level solvers for min_y f(y), y a flat vector, stopped on the gradient.

Each solver runs a `lax.while_loop` until

    ||grad f(y_k)||_2 <= tol,   or k = max_steps,   or a non-finite iterate,

and returns ``(y, steps, value, grad_norm, status)``; a backtracking search
that finds no decrease in 40 halvings stops the loop at the last accepted
point with LINESEARCH_FAILED (usually: tol below what rounding allows). They are never
differentiated (the solution map gets its derivative from the implicit
function theorem, see `solver.py`), so the loops need no reverse-mode
support.

  lbfgs   `optax.lbfgs` (memory m) with its zoom line search (strong Wolfe
          conditions); the value and gradient the line search accepted are
          reused, so one step costs the line search's evaluations only.
  gd      y_{k+1} = y_k - s grad f(y_k) with a fixed step s, or, without
          one, Armijo backtracking (c1 = 1/2, so that on a quadratic the
          accepted step is in (1/(2L), 1/L]) from twice the previous step.
  newton  y_{k+1} = y_k - t H^{-1} grad f(y_k) with the dense Hessian
          H = hess f(y_k) and Armijo backtracking on t (from t = 1); the
          gradient step is taken where the Newton step is not a descent
          direction. For small y only: each step forms H (m Hessian-vector
          products) and factors it (O(m^3)).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

SUCCESS = 0
MAX_STEPS = 1
NONFINITE = 2
LINESEARCH_FAILED = 3
SOLVERS = ("lbfgs", "gd", "newton")
_RUNNING = -1
_ARMIJO_NEWTON = 1e-4  # sufficient-decrease constants c1 of the backtracking searches
_ARMIJO_GD = 0.5       # (c1 = 1/2 accepts t <= 1/L on a quadratic: no zig-zag at 2/L)
_MAX_BACKTRACKS = 40  # halvings per backtracking search


class Options(NamedTuple):
  """Static settings of the lower solve (validated in `solver.py`)."""
  solver: str
  tol: float
  max_steps: int
  stepsize: Optional[float]
  memory_size: int


def _status(finite, grad_norm, tol, searched=True):
  """SUCCESS, NONFINITE, LINESEARCH_FAILED or still running (-1)."""
  return jnp.where(~finite, NONFINITE, jnp.where(
      grad_norm <= tol, SUCCESS, jnp.where(searched, _RUNNING, LINESEARCH_FAILED)))


def _keep_if_failed(ok, new, old):
  """The new (y, value, grad) where the line search succeeded, else the old."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def _finish(y, steps, value, grad_norm, status):
  status = jnp.where(status == _RUNNING, MAX_STEPS, status).astype(jnp.int32)
  return y, steps, value, grad_norm, status


def _start(fun, y0, tol):
  value, grad = jax.value_and_grad(fun)(y0)
  grad_norm = jnp.linalg.norm(grad)
  finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
  return value, grad, grad_norm, _status(finite, grad_norm, tol)


def _loop(body, init, max_steps):
  """Runs ``body`` while the status (last entry of the carry) is running."""
  def cond(carry):
    return (carry[-1] == _RUNNING) & (carry[-2] < max_steps)
  return jax.lax.while_loop(cond, body, init)


def _armijo(fun, y, value, grad, direction, t0, c1):
  """Backtracking from t0 until f(y + t d) <= f(y) + c1 t <grad, d>.

  Near the minimizer the decrease falls below the rounding of f and this
  test fails for every t; there the approximate Armijo condition of Hager
  and Zhang (SIAM J. Optim. 2005, (4.2)), exact for quadratics, is used:

      <grad f(y + t d), d> <= (2 c1 - 1) <grad, d>   where   |f(y + t d) - f(y)|
                                                          <= 100 eps (1 + |f(y)|).

  Returns ``(t, y + t d, value, grad, accepted)`` at the accepted point (or
  at the last trial when none was accepted in `_MAX_BACKTRACKS` halvings).
  """
  slope = jnp.vdot(grad, direction)
  value_and_grad = jax.value_and_grad(fun)
  noise = 100 * jnp.finfo(y.dtype).eps * (1 + jnp.abs(value))

  def trial(t):
    y_new = y + t * direction
    v, g = value_and_grad(y_new)
    decrease = v <= value + c1 * t * slope
    approximate = (jnp.abs(v - value) <= noise) & (jnp.vdot(g, direction) <= (2 * c1 - 1) * slope)
    return y_new, v, g, jnp.isfinite(v) & (decrease | approximate)

  def cond(state):
    return (~state[-1]) & (state[1] < _MAX_BACKTRACKS)

  def body(state):
    t = 0.5 * state[0]
    return (t, state[1] + 1) + trial(t)

  t, _, y_new, v, g, ok = jax.lax.while_loop(cond, body, (t0, 0) + trial(t0))
  return t, y_new, v, g, ok


def _in_dtype(fun, dtype):
  return lambda y: fun(jnp.asarray(y, dtype))


def lbfgs(fun: Callable, y0, options: Options):
  opt = optax.lbfgs(memory_size=options.memory_size)
  # With x64 on, the zoom line search's step sizes are float64 and promote
  # float32 trial points; the objective sees y in its own dtype.
  fun = _in_dtype(fun, y0.dtype)
  value0, grad, grad_norm, status = _start(fun, y0, options.tol)

  def body(carry):
    y, state, value, grad, _, steps, _ = carry
    updates, state = opt.update(grad, state, y, value=value, grad=grad, value_fn=fun)
    y = optax.apply_updates(y, updates).astype(y0.dtype)
    value = optax.tree.get(state, "value").astype(value0.dtype)
    grad = optax.tree.get(state, "grad").astype(y0.dtype)
    grad_norm = jnp.linalg.norm(grad)
    finite = jnp.all(jnp.isfinite(y)) & jnp.isfinite(value) & jnp.isfinite(grad_norm)
    return y, state, value, grad, grad_norm, steps + 1, _status(finite, grad_norm, options.tol)

  init = (y0, opt.init(y0), value0, grad, grad_norm, jnp.array(0, jnp.int32), status)
  y, _, value, _, grad_norm, steps, status = _loop(body, init, options.max_steps)
  return _finish(y, steps, value, grad_norm, status)


def gd(fun: Callable, y0, options: Options):
  value, grad, grad_norm, status = _start(fun, y0, options.tol)
  fixed = options.stepsize is not None
  t0 = jnp.asarray(options.stepsize if fixed else 1.0, y0.dtype)

  def body(carry):
    y, value, grad, t, _, steps, _ = carry
    if fixed:
      y = y - t * grad
      value, grad = jax.value_and_grad(fun)(y)
      ok = True
    else:
      t, *new, ok = _armijo(fun, y, value, grad, -grad, 2 * t, _ARMIJO_GD)
      y, value, grad = _keep_if_failed(ok, tuple(new), (y, value, grad))
    grad_norm = jnp.linalg.norm(grad)
    finite = jnp.all(jnp.isfinite(y)) & jnp.isfinite(value) & jnp.isfinite(grad_norm)
    return y, value, grad, t, grad_norm, steps + 1, _status(finite, grad_norm, options.tol, ok)

  init = (y0, value, grad, t0, grad_norm, jnp.array(0, jnp.int32), status)
  y, value, _, _, grad_norm, steps, status = _loop(body, init, options.max_steps)
  return _finish(y, steps, value, grad_norm, status)


def newton(fun: Callable, y0, options: Options):
  value, grad, grad_norm, status = _start(fun, y0, options.tol)
  hessian = jax.hessian(fun)

  def body(carry):
    y, value, grad, _, steps, _ = carry
    step = jnp.linalg.solve(hessian(y), grad)
    descent = jnp.all(jnp.isfinite(step)) & (jnp.vdot(grad, step) > 0)
    direction = -jnp.where(descent, step, grad)
    _, *new, ok = _armijo(fun, y, value, grad, direction, jnp.ones((), y.dtype),
                           _ARMIJO_NEWTON)
    y, value, grad = _keep_if_failed(ok, tuple(new), (y, value, grad))
    grad_norm = jnp.linalg.norm(grad)
    finite = jnp.all(jnp.isfinite(y)) & jnp.isfinite(value) & jnp.isfinite(grad_norm)
    return y, value, grad, grad_norm, steps + 1, _status(finite, grad_norm, options.tol, ok)

  init = (y0, value, grad, grad_norm, jnp.array(0, jnp.int32), status)
  y, value, _, grad_norm, steps, status = _loop(body, init, options.max_steps)
  return _finish(y, steps, value, grad_norm, status)


def minimize(fun: Callable, y0, options: Options):
  """Runs ``options.solver`` on ``fun`` from ``y0``.

  Returns ``(y, steps, value, grad_norm, status)``.
  """
  return {"lbfgs": lbfgs, "gd": gd, "newton": newton}[options.solver](fun, y0, options)
