"""Lower-level solvers for min_y f(y), y a flat vector, stopped on the gradient.

Each solver runs one `lax.while_loop` until

    ||grad f(y_k)||_2 <= tol,   or k = max_steps,   or a non-finite value,

and returns ``(y, steps, value, grad_norm, status, inverse)``, where
``inverse`` is what the solver knows of the inverse Hessian at y (the
L-BFGS memory, Newton's LU factors of hess f(y), or nothing for gd), for
`apply_inverse`: the adjoint solve of the implicit hypergradient reuses it
(SHINE, Ramzi et al., ICLR 2022). They are never
differentiated (the solution map gets its derivative from the implicit
function theorem, see `solver.py`), so the loops need no reverse-mode
support.

  lbfgs   L-BFGS (memory m, two-loop recursion) with Armijo backtracking
          from the unit step.
  gd      y_{k+1} = y_k - s grad f(y_k) with a fixed step s (gradients only),
          or, without one, Armijo backtracking (c1 = 1/2, so that on a
          quadratic the accepted step lies in (1/(2L), 1/L]: no zig-zag at
          2/L) from twice the previous step.
  newton  y_{k+1} = y_k - t H^{-1} grad f(y_k) with the dense Hessian
          H = hess f(y_k) and Armijo backtracking on t from t = 1. For small
          y only: each evaluation forms H (m Hessian-vector products) and
          factors it (O(m^3)).

Where a direction is not one of descent, the solvers step along -grad f.

The backtracking solvers share one loop (`_search`) in which each pass
evaluates f and grad f at one trial point y + t d: accepted, it becomes the
next iterate and the next direction is computed; rejected, t is halved.
There is no inner loop, so an accepted unit step costs one evaluation and
no line-search bookkeeping. (`optax.lbfgs` with its zoom line search took
as many steps on the benchmark problems of `bench/suites/implicit_peers.py`
but about 10 us more per step on a CPU, which dominated on small problems,
and twice the compile time.)
After `_MAX_BACKTRACKS` halvings without decrease the loop stops at the
last accepted point with LINESEARCH_FAILED (usually: a tol below what
rounding allows).
"""

from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp

from bilevel_jax._src.status import LINESEARCH_FAILED
from bilevel_jax._src.status import MAX_STEPS
from bilevel_jax._src.status import NONFINITE
from bilevel_jax._src.status import SUCCESS

SOLVERS = ("lbfgs", "gd", "newton")
_RUNNING = -1
_ARMIJO = 1e-4  # sufficient-decrease constant c1 (L-BFGS, Newton)
_ARMIJO_GD = 0.5  # c1 of backtracking gradient descent
_MAX_BACKTRACKS = 40  # halvings of t before the search fails


class Options(NamedTuple):
  """Static settings of the lower solve (validated in `solver.py`)."""

  solver: str
  tol: float
  max_steps: int
  stepsize: float | None
  memory_size: int


class _Method(NamedTuple):
  """A descent method for `_search`.

  direction(aux, y, grad) -> (d, aux): the search direction at an accepted
    point (aux: the method's state, e.g. the L-BFGS memory).
  update(aux, s, dg, accept) -> aux: after the trial y + s, with dg the
    change of the gradient; a no-op unless ``accept`` (so that large
    buffers are updated in place rather than copied and selected).
  first_step(aux, grad, t) -> t0: the first trial step (t: the last accepted).
  select(accept, aux_accepted, aux_rejected) -> aux: merges the two.
  """

  direction: Callable
  update: Callable
  first_step: Callable
  c1: float
  aux: Any
  select: Callable = lambda accept, a, r: jax.tree_util.tree_map(
    lambda x, y: jnp.where(accept, x, y), a, r
  )


class _State(NamedTuple):
  y: Any
  value: Any
  grad: Any
  direction: Any
  slope: Any  # <grad, direction>
  t: Any  # the current trial step
  backtracks: Any  # halvings in the current search
  aux: Any
  grad_norm: Any
  steps: Any
  status: Any


def _finish(y, steps, value, grad_norm, status, inverse=()):
  status = jnp.where(status == _RUNNING, MAX_STEPS, status).astype(jnp.int32)
  return y, steps, value, grad_norm, status, inverse


def _loop(body, init, max_steps):
  """Runs ``body`` while the status (last field) is running and steps remain."""

  def cond(carry):
    return (carry[-1] == _RUNNING) & (carry[-2] < max_steps)

  return jax.lax.while_loop(cond, body, init)


def _descent(method, aux, y, grad):
  """The method's direction, or -grad where that is no descent direction."""
  d, aux = method.direction(aux, y, grad)
  slope = jnp.vdot(grad, d)
  ok = jnp.isfinite(slope) & (slope < 0)
  return jnp.where(ok, d, -grad), jnp.where(ok, slope, -jnp.vdot(grad, grad)), aux, ok


def _search(fun: Callable, y0, options: Options, method: _Method):
  """The backtracking loop shared by lbfgs, gd (without a step) and newton.

  A trial y + t d is accepted when f(y + t d) <= f(y) + c1 t <grad, d>, or,
  where the decrease is below the rounding of f (|f(y + t d) - f(y)| <=
  100 eps (1 + |f(y)|)), by the approximate Armijo condition of Hager and
  Zhang (SIAM J. Optim. 2005, (4.2)), exact for quadratics:
  <grad f(y + t d), d> <= (2 c1 - 1) <grad, d>.
  """
  value_and_grad = jax.value_and_grad(fun)
  eps = jnp.finfo(y0.dtype).eps
  c1 = method.c1

  value, grad = value_and_grad(y0)
  grad_norm = jnp.linalg.norm(grad)
  d, slope, aux, _ = _descent(method, method.aux, y0, grad)
  t = method.first_step(aux, grad, jnp.ones((), y0.dtype))
  finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
  status = jnp.where(~finite, NONFINITE, jnp.where(grad_norm <= options.tol, SUCCESS, _RUNNING))
  init = _State(
    y0,
    value,
    grad,
    d,
    slope,
    t,
    jnp.array(0, jnp.int32),
    aux,
    grad_norm,
    jnp.array(0, jnp.int32),
    status,
  )

  def body(s: _State):
    y_try = s.y + s.t * s.direction
    v, g = value_and_grad(y_try)
    noise = 100 * eps * (1 + jnp.abs(s.value))
    decrease = v <= s.value + c1 * s.t * s.slope
    approximate = (jnp.abs(v - s.value) <= noise) & (
      jnp.vdot(g, s.direction) <= (2 * c1 - 1) * s.slope
    )
    accept = jnp.isfinite(v) & (decrease | approximate)

    # Accepted: the next iterate, its direction and first trial step.
    aux = method.update(s.aux, y_try - s.y, g - s.grad, accept)
    d, slope, aux_next, _ = _descent(method, aux, y_try, g)
    t_next = method.first_step(aux_next, g, s.t)
    g_norm = jnp.linalg.norm(g)
    accepted = _State(
      y_try,
      v,
      g,
      d,
      slope,
      t_next,
      jnp.zeros_like(s.backtracks),
      aux_next,
      g_norm,
      s.steps + 1,
      jnp.where(
        ~jnp.isfinite(g_norm), NONFINITE, jnp.where(g_norm <= options.tol, SUCCESS, _RUNNING)
      ),
    )
    # Rejected: halve t.
    failed = s.backtracks + 1 >= _MAX_BACKTRACKS
    rejected = s._replace(
      t=0.5 * s.t,
      backtracks=s.backtracks + 1,
      aux=aux,
      status=jnp.where(failed, LINESEARCH_FAILED, s.status),
    )
    # The method's state is updated in place (its update saw `accept`); only
    # the small entries it may reset on a rejected trial are selected.
    aux_sel = method.select(accept, aux_next, aux)
    out = jax.tree_util.tree_map(
      lambda a, r: jnp.where(accept, a, r), accepted._replace(aux=()), rejected._replace(aux=())
    )
    return out._replace(aux=aux_sel)

  s = _loop(body, init, options.max_steps)
  return _finish(s.y, s.steps, s.value, s.grad_norm, s.status, s.aux)


# ------------------------------------------------------------------ L-BFGS


def _two_loop(grad, memory):
  """H_k grad by the L-BFGS two-loop recursion (Nocedal & Wright, Alg. 7.4)
  over the ``count`` newest pairs of the circular memory, H_k^0 = gamma I."""
  s_mem, y_mem, rho, count, newest, gamma = memory
  m = rho.shape[0]

  def newest_first(j, carry):
    q, alphas = carry
    i = (newest - j) % m
    a = jnp.where(j < count, rho[i] * jnp.vdot(s_mem[i], q), 0.0)
    return q - a * y_mem[i], alphas.at[i].set(a)

  def oldest_first(j, r):
    k = m - 1 - j
    i = (newest - k) % m
    b = rho[i] * jnp.vdot(y_mem[i], r)
    return r + jnp.where(k < count, alphas[i] - b, 0.0) * s_mem[i]

  q, alphas = jax.lax.fori_loop(0, m, newest_first, (grad, jnp.zeros_like(rho)))
  return jax.lax.fori_loop(0, m, oldest_first, gamma * q)


def _lbfgs_method(y0, memory_size):
  """L-BFGS: a pair (s, dg) is stored when s^T dg > eps |s| |dg|. On a
  strongly convex f every step has s^T dg >= mu |s|^2 > 0, the curvature
  condition a Wolfe line search exists to enforce, so backtracking suffices;
  a direction that is no descent direction empties the memory."""
  m, dtype = memory_size, y0.dtype
  eps = jnp.finfo(dtype).eps

  def direction(memory, y, grad):
    d = -_two_loop(grad, memory)
    descent = jnp.vdot(grad, d) < 0
    return d, memory[:3] + (jnp.where(descent, memory[3], 0),) + memory[4:]

  def update(memory, s, dg, accept):
    s_mem, y_mem, rho, count, newest, gamma = memory
    sy = jnp.vdot(s, dg)
    store = accept & (sy > eps * jnp.linalg.norm(s) * jnp.linalg.norm(dg))
    slot = jnp.where(store, (newest + 1) % m, newest)
    return (
      s_mem.at[slot].set(jnp.where(store, s, s_mem[slot])),
      y_mem.at[slot].set(jnp.where(store, dg, y_mem[slot])),
      rho.at[slot].set(jnp.where(store, 1 / jnp.where(store, sy, 1), rho[slot])),
      jnp.where(store, jnp.minimum(count + 1, m), count),
      slot,
      jnp.where(store, sy / jnp.where(store, jnp.vdot(dg, dg), 1), gamma),
    )

  def first_step(memory, grad, t):
    # Unit step, except from steepest descent (empty memory): |t d| <= 1.
    return jnp.where(memory[3] == 0, jnp.minimum(1.0, 1.0 / jnp.linalg.norm(grad)), 1.0).astype(
      dtype
    )

  memory = (
    jnp.zeros((m,) + y0.shape, dtype),
    jnp.zeros((m,) + y0.shape, dtype),
    jnp.zeros((m,), dtype),
    jnp.array(0, jnp.int32),
    jnp.array(m - 1, jnp.int32),
    jnp.ones((), dtype),
  )
  select = lambda accept, a, r: (
    r[:3] + jax.tree_util.tree_map(lambda x, y: jnp.where(accept, x, y), a[3:], r[3:])
  )
  return _Method(direction, update, first_step, _ARMIJO, memory, select)


def lbfgs(fun: Callable, y0, options: Options):
  return _search(fun, y0, options, _lbfgs_method(y0, options.memory_size))


# ---------------------------------------------------------- gradient descent


def gd(fun: Callable, y0, options: Options):
  if options.stepsize is not None:
    return _gd_fixed(fun, y0, options)
  method = _Method(
    direction=lambda aux, y, grad: (-grad, aux),
    update=lambda aux, s, dg, accept: aux,
    first_step=lambda aux, grad, t: 2 * t,
    c1=_ARMIJO_GD,
    aux=(),
  )
  return _search(fun, y0, options, method)


def _gd_fixed(fun: Callable, y0, options: Options):
  """Fixed steps need gradients only; f is evaluated once, at the end."""
  grad_fn = jax.grad(fun)
  step = jnp.asarray(options.stepsize, y0.dtype)

  def norm_status(grad):
    grad_norm = jnp.linalg.norm(grad)
    return grad_norm, jnp.where(
      ~jnp.isfinite(grad_norm), NONFINITE, jnp.where(grad_norm <= options.tol, SUCCESS, _RUNNING)
    )

  def body(carry):
    y, grad, _, steps, _ = carry
    y = y - step * grad
    grad = grad_fn(y)
    grad_norm, status = norm_status(grad)
    return y, grad, grad_norm, steps + 1, status

  grad0 = grad_fn(y0)
  grad_norm0, status0 = norm_status(grad0)
  init = (y0, grad0, grad_norm0, jnp.array(0, jnp.int32), status0)
  y, _, grad_norm, steps, status = _loop(body, init, options.max_steps)
  value = fun(y)
  status = jnp.where(jnp.isfinite(value), status, NONFINITE)
  return _finish(y, steps, value, grad_norm, status)


# ------------------------------------------------------------------ Newton


def newton(fun: Callable, y0, options: Options):
  """Newton's direction by the LU factors of hess f(y) (partial pivoting, as
  `jnp.linalg.solve`); the factors at the accepted point are the method's
  state, so the factors at the returned y come out with it."""
  hessian = jax.hessian(fun)

  def direction(aux, y, grad):
    factors = jax.scipy.linalg.lu_factor(hessian(y))
    return -jax.scipy.linalg.lu_solve(factors, grad), factors

  n = y0.shape[0]
  method = _Method(
    direction=direction,
    update=lambda aux, s, dg, accept: aux,
    first_step=lambda aux, grad, t: jnp.ones_like(t),
    c1=_ARMIJO,
    aux=(jnp.eye(n, dtype=y0.dtype), jnp.arange(n, dtype=jnp.int32)),
  )
  return _search(fun, y0, options, method)


def minimize(fun: Callable, y0, options: Options):
  """Runs ``options.solver`` on ``fun`` from ``y0``.

  Returns ``(y, steps, value, grad_norm, status, inverse)`` (see the module
  docstring; ``inverse`` goes to `apply_inverse`).
  """
  return {"lbfgs": lbfgs, "gd": gd, "newton": newton}[options.solver](fun, y0, options)


def apply_inverse(solver: str, inverse, vector):
  """The solver's inverse-Hessian estimate at its returned y, applied to ``vector``.

  * ``"lbfgs"``: H_k vector by the two-loop recursion over the memory of the
    solve (Nocedal & Wright, Alg. 7.4): a symmetric positive definite
    approximation of hess f(y)^{-1} (every stored pair has s^T dg > 0),
    exact only along the directions the solve explored; SHINE's "shared
    inverse estimate" (Ramzi et al., ICLR 2022, Section 3).
  * ``"newton"``: hess f(y)^{-1} vector, exact up to rounding, by the LU
    factors of the Hessian Newton formed at y (to choose its last direction).

  Gradient descent keeps no estimate (a ValueError).
  """
  if solver == "lbfgs":
    return _two_loop(vector, inverse)
  if solver == "newton":
    return jax.scipy.linalg.lu_solve(inverse, vector)
  raise ValueError(f"solver={solver!r} keeps no inverse-Hessian estimate.")
