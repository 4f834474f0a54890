"""The one accelerated projected-gradient loop (FISTA) and the simplex projection.

Minimizes a smooth h over a closed convex set C, given h's gradient and the
projection P_C, by the accelerated projected gradient of Beck and Teboulle
(2009) on flat arrays:

    x_{k+1} = P_C(z_k - grad h(z_k) / L_k),                              (1)
    t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2,
    z_{k+1} = x_{k+1} + ((t_k - 1) / t_{k+1}) (x_{k+1} - x_k),

from x_0 = z_0 (feasible: the caller projects it) and t_0 = 1.  Options,
each off or on per caller:

* ``restart``: the adaptive restart of O'Donoghue and Candes (2015): when the
  momentum points uphill, t_{k+1} = 1 and z_{k+1} = x_{k+1}.  The test is
  "gradient_mapping", <z_k - x_{k+1}, x_{k+1} - x_k> > 0 (the generalized
  gradient L (z_k - x_{k+1}) against the step; their test for composite
  problems), "gradient", <grad h(z_k), x_{k+1} - x_k> > 0, a callable
  ``restart(x_k, z_k, grad_k, x_{k+1}) -> bool``, or None (plain FISTA).
* ``backtracking``: L_k is doubled (at most ``max_backtracks`` times per
  step) until the sufficient-decrease test

      h(x_{k+1}) <= h(z_k) + <grad h(z_k), d> + L/2 ||d||^2 + 1e-12 |h(z_k)|,
      d = x_{k+1} - z_k,

  holds (needs ``fun``); otherwise L is fixed (a known Lipschitz constant
  of grad h, step 1/L).
* Stopping: after ``max_steps`` steps, or when the stopping quantity is
  <= ``tol``: by default the gradient-mapping norm at the extrapolated point,
  L_k ||z_k - x_{k+1}|| (0 exactly at a minimizer), or ``residual(x_{k+1})``
  (any quantity computed from the new iterate, such as a duality gap).
  ``tol=None`` runs exactly ``max_steps`` steps (a fixed unroll).  A NaN
  stopping quantity never stops the loop, so a NaN shows as MAX_STEPS or
  NONFINITE in the caller's status, not as convergence.

Callers: `bilevel_jax.value.quadratic` (backtracking, gradient-mapping
restart, gradient-mapping stop) and `bilevel_jax.value.distance_to_hull`
(fixed L, no restart, fixed step count).  A dual FISTA with a fixed step,
its own projection, the gradient restart test and a duality-gap stop (the
SQP direction of `minnorm`) fits the same call:
``fista(project, z0, grad=neg_dual_grad, lipschitz=L, max_steps=...,
tol=tol, restart="gradient", residual=gap_of)``.

The loop is a `lax.while_loop`: it is never differentiated (its callers
attach their own derivative rules).
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

RESTARTS = ("gradient_mapping", "gradient", None)


class FistaState(NamedTuple):
  """The state of `fista` (all arrays).

  Attributes:
    x: the iterate x_k (feasible).
    z: the extrapolated point z_k.
    t: the momentum parameter t_k.
    lipschitz: the Lipschitz estimate L_k (fixed without backtracking).
    num_steps: steps taken (int32).
    residual: the stopping quantity of the last step (inf before the first).
    restarts: momentum restarts (int32).
  """

  x: jax.Array
  z: jax.Array
  t: jax.Array
  lipschitz: jax.Array
  num_steps: jax.Array
  residual: jax.Array
  restarts: jax.Array


def project_simplex(v, total=1.0):
  """Euclidean projection onto {x >= 0, sum x = total} (sort-based; Held,
  Wolfe and Crowder 1974, Duchi et al. 2008) of a 1-D array.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax._src.fista import project_simplex
    >>> project_simplex(jnp.array([0.5, 2.0, -1.0])).tolist()
    [0.0, 1.0, 0.0]
  """
  n = v.shape[-1]
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u) - total
  ind = jnp.arange(1, n + 1, dtype=v.dtype)
  cond = u - css / ind > 0
  rho = jnp.max(jnp.where(cond, jnp.arange(n), 0))
  theta = css[rho] / (rho + 1)
  return jnp.maximum(v - theta, 0)


def gradient_mapping(grad: Callable, project: Callable, x, lipschitz):
  """L ||x - P(x - grad(x) / L)||: 0 exactly at a minimizer over C."""
  return lipschitz * jnp.linalg.norm(x - project(x - grad(x) / lipschitz))


def _restart_test(restart):
  if restart is None or callable(restart):
    return restart
  if restart == "gradient_mapping":
    return lambda x, z, g, x_new: jnp.vdot(z - x_new, x_new - x) > 0
  if restart == "gradient":
    return lambda x, z, g, x_new: jnp.vdot(g, x_new - x) > 0
  raise ValueError(f"`restart` must be one of {RESTARTS} or a callable, got {restart!r}.")


def fista(
  project: Callable,
  x0,
  *,
  lipschitz,
  max_steps: int,
  tol=None,
  fun: Callable | None = None,
  grad: Callable | None = None,
  backtracking: bool = False,
  max_backtracks: int = 40,
  restart: str | Callable | None = "gradient_mapping",
  residual: Callable | None = None,
) -> FistaState:
  """Accelerated projected gradient (1) from the feasible point ``x0``.

  Args:
    project: P_C on arrays shaped like ``x0``.
    x0: feasible starting point (the caller projects it).
    lipschitz: L_0 > 0 (the step is 1/L); with ``backtracking`` only a start.
    max_steps: step cap (static).
    tol: stop when the stopping quantity is <= tol; None: run max_steps steps.
    fun: h (needed for ``backtracking``; its gradient by autodiff when
      ``grad`` is None).
    grad: grad h (default ``jax.grad(fun)``).
    backtracking: double L until the sufficient-decrease test holds.
    max_backtracks: doublings per step at most.
    restart: "gradient_mapping", "gradient", None or a callable (module doc).
    residual: ``residual(x_new) -> scalar`` replacing the gradient-mapping
      stopping quantity.

  Returns:
    the final `FistaState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax._src.fista import fista
    >>> fun = lambda x: jnp.sum((x - jnp.array([2.0, -0.5])) ** 2)   # over [0, 1]^2
    >>> state = fista(lambda x: jnp.clip(x, 0.0, 1.0), jnp.zeros(2), fun=fun, lipschitz=1.0,
    ...               tol=1e-10, max_steps=100, backtracking=True)
    >>> state.x.tolist(), bool(state.residual <= 1e-10)
    ([1.0, 0.0], True)
  """
  if backtracking and fun is None:
    raise ValueError("`fun` is required with `backtracking=True`.")
  if grad is None and fun is None:
    raise ValueError("one of `fun` and `grad` is required.")
  restart_test = _restart_test(restart)
  if grad is None:
    assert fun is not None  # checked above
    grad = jax.grad(fun)
    value_and_grad = jax.value_and_grad(fun)
  else:
    value_and_grad = lambda z: (fun(z), grad(z))  # type: ignore[misc]

  def backtrack(z, hz, gz, lip):
    def cond(c):
      lip, x_new, j = c
      d = x_new - z
      ok = fun(x_new) <= hz + jnp.vdot(gz, d) + 0.5 * lip * jnp.vdot(d, d) + 1e-12 * jnp.abs(hz)
      return jnp.logical_and(~ok, j < max_backtracks)

    def body(c):
      lip, _, j = c
      lip = 2.0 * lip
      return lip, project(z - gz / lip), j + 1

    lip, x_new, _ = lax.while_loop(cond, body, (lip, project(z - gz / lip), 0))
    return lip, x_new

  def cond(s):
    if tol is None:
      return s.num_steps < max_steps
    return jnp.logical_and(s.num_steps < max_steps, ~(s.residual <= tol))

  def body(s):
    if backtracking:
      hz, gz = value_and_grad(s.z)
      lip, x_new = backtrack(s.z, hz, gz, s.lipschitz)
    else:
      gz, lip = grad(s.z), s.lipschitz
      x_new = project(s.z - gz / lip)
    if residual is None:
      res = lip * jnp.linalg.norm(s.z - x_new)
    else:
      res = residual(x_new)
    if restart_test is None:
      t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t))
      z_new = x_new + ((s.t - 1.0) / t_new) * (x_new - s.x)
      restarted = jnp.zeros((), bool)
    else:
      restarted = restart_test(s.x, s.z, gz, x_new)
      t_new = jnp.where(restarted, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s.t * s.t)))
      beta = jnp.where(restarted, 0.0, (s.t - 1.0) / t_new)
      z_new = x_new + beta * (x_new - s.x)
    return FistaState(
      x_new,
      z_new,
      t_new.astype(s.t.dtype),
      lip,
      s.num_steps + 1,
      jnp.asarray(res).astype(s.residual.dtype),
      s.restarts + restarted.astype(s.restarts.dtype),
    )

  dtype = x0.dtype
  state = FistaState(
    x0,
    x0,
    jnp.ones((), dtype),
    jnp.asarray(lipschitz, dtype),
    jnp.zeros((), jnp.int32),
    jnp.asarray(jnp.inf, dtype),
    jnp.zeros((), jnp.int32),
  )
  return lax.while_loop(cond, body, state)
