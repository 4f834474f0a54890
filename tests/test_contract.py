"""One contract, every method: jit equals eager, vmap equals a loop, no retrace
on a second call, float32 and float64, status codes, ``throw=``, and a bad
input that names its argument.

Each `Case` builds, for a dtype, a function ``x -> outputs`` (the method's
solution and a derivative through it where the method is differentiable), a
call that fails at run time with a known status, and a call with a bad
argument. The per-module test files keep what is specific to each method
(closed forms, finite differences, paper examples).
"""

from __future__ import annotations

import functools
from typing import NamedTuple
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import SolverError, Status, bda, composite, implicit, upper, value


class Case(NamedTuple):
  make: Callable  # dtype -> (fn(x, throw) -> (status, outputs), x0, xs (3, ...))
  failing: Callable  # throw -> solution-like with .info.status (a run-time failure)
  failure: int  # the status `failing` reports
  bad_input: Callable  # () -> raises
  error: type
  match: str
  rtol32: float = 1e-3  # float32 against float64


def _status_and(solution, *outputs):
  return solution.info.status, outputs


# ----------------------------------------------------------------- problems
A = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 1.0]])


def _lower(x, y):
  return 0.5 * y @ A @ y - jnp.sum(x * y)


def _upper(x, y):
  return 0.5 * jnp.sum((y - 1.0) ** 2) + 0.1 * jnp.sum(x**2)


def _bda_case(alpha):
  kw = dict(steps=40, upper_lr=0.3, lower_lr=0.3, alpha=alpha)

  def make(dtype):
    def fn(x, throw=False):
      y0 = jnp.zeros(3, dtype)
      value_, grad, sol = bda.hypergradient(
        _upper, _lower, x, y0, return_info=True, throw=throw, **kw
      )
      return _status_and(sol, sol.y, value_, grad)

    x0 = jnp.array([0.3, -0.2, 0.5], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 1.0, 3, dtype=dtype)[:, None]

  def failing(throw):  # diverging steps
    return bda.solve(
      _upper,
      _lower,
      jnp.ones(3),
      jnp.zeros(3),
      steps=400,
      upper_lr=5.0,
      lower_lr=5.0,
      alpha=alpha,
      throw=throw,
    )

  def bad():
    bda.solve(
      _upper, _lower, jnp.ones(3), jnp.zeros(3), steps=10, upper_lr=0.3, lower_lr=-1.0, alpha=alpha
    )

  return Case(make, failing, Status.NONFINITE, bad, ValueError, "`lower_lr`")


def _implicit_case():
  def make(dtype):
    def fn(x, throw=False):
      value_, grad, sol = implicit.hypergradient(
        _upper, _lower, x, jnp.zeros(3, dtype), return_info=True, throw=throw
      )
      return _status_and(sol, sol.y, value_, grad)

    x0 = jnp.array([0.3, -0.2, 0.5], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 1.0, 3, dtype=dtype)[:, None]

  def failing(throw):
    return implicit.solve(
      _lower, jnp.ones(3), jnp.zeros(3), solver="gd", stepsize=1e-3, max_steps=2, throw=throw
    )

  def bad():
    implicit.solve(_lower, jnp.ones(3), jnp.zeros(3), solver="bfgs")

  return Case(make, failing, Status.MAX_STEPS, bad, ValueError, "`solver`")


def _composite_case():
  # Lasso: g = |B y - x|^2 / 2, h = l1 on G(y) = (y, -y); alpha, beta small.
  h = composite.l1(3)
  g = lambda x, y: 0.5 * jnp.sum((A @ y - x) ** 2)
  G = lambda x, y: jnp.concatenate([y, -y]) * 0.3

  def make(dtype):
    def fn(x, throw=False):
      def objective(xx):
        sol = composite.solve(
          g, G, h, xx, jnp.zeros(3, dtype), alpha=1e-3, beta=1e-3, method="newton", throw=throw
        )
        return jnp.sum((sol.y - 0.5) ** 2), sol

      (val, sol), grad = jax.value_and_grad(objective, has_aux=True)(x)
      return _status_and(sol, sol.y, val, grad)

    x0 = jnp.array([1.0, -0.8, 0.6], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 0.5, 3, dtype=dtype)[:, None]

  def failing(throw):
    return composite.solve(
      g,
      G,
      h,
      jnp.array([1.0, -0.8, 0.6]),
      jnp.zeros(3),
      alpha=1e-3,
      beta=1e-3,
      method="newton",
      max_steps=1,
      throw=throw,
    )

  def bad():
    composite.solve(g, G, h, jnp.ones(3), jnp.zeros(3), alpha=-1.0, beta=1e-3)

  return Case(make, failing, Status.MAX_STEPS, bad, ValueError, "`alpha`", rtol32=1e-2)


def _quadratic_case():
  g = lambda x, y: jnp.sum(x * y) + 0.5 * jnp.sum(y**2)
  box = lambda y: jnp.clip(y, -1.0, 1.0)

  def make(dtype):
    def fn(x, throw=False):
      solve = lambda xx: value.quadratic(
        g, xx, jnp.zeros(3, dtype), mu=0.1, projection=box, throw=throw
      )
      sol = solve(x)
      return _status_and(sol, sol.y, sol.value, jax.grad(lambda xx: solve(xx).value)(x))

    x0 = jnp.array([0.3, -2.0, 0.5], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 1.0, 3, dtype=dtype)[:, None]

  def failing(throw):
    return value.quadratic(
      g,
      jnp.array([0.3, -2.0, 0.5]),
      jnp.zeros(3),
      mu=0.1,
      projection=box,
      max_steps=1,
      tol=1e-14,
      throw=throw,
    )

  def bad():
    value.quadratic(g, jnp.ones(3), jnp.zeros(3), mu=-0.1)

  return Case(make, failing, Status.MAX_STEPS, bad, ValueError, "`mu`")


def _entropic_case():
  g = lambda x, y: jnp.sum((y - x[:1]) ** 2) + x[1] * y[0]
  box = (jnp.array([-1.0]), jnp.array([1.0]))

  def make(dtype):
    b = tuple(jnp.asarray(v, dtype) for v in box)

    def fn(x, throw=False):
      solve = lambda xx: value.entropic(g, xx, mu=0.05, box=b, throw=throw)
      sol = solve(x)
      return _status_and(sol, sol.y, sol.value, jax.grad(lambda xx: solve(xx).value)(x))

    x0 = jnp.array([0.2, 0.4], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 0.3, 3, dtype=dtype)[:, None]

  def failing(throw):  # too coarse a rule for this mu
    return value.entropic(
      g, jnp.array([0.2, 0.4]), mu=1e-3, box=box, order=2, panels=1, throw=throw
    )

  def bad():
    value.entropic(g, jnp.array([0.2, 0.4]), mu=0.05, box=box, rule="simpson")

  return Case(make, failing, Status.INACCURATE, bad, ValueError, "`rule`")


def _vfp_case():
  g = lambda x, y: 0.5 * jnp.sum((y - x) ** 2)
  f = lambda x, y: 0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * jnp.sum(y**2)

  def value_fn(x, mu):
    return value.quadratic(g, x, jnp.zeros(2, x.dtype), mu=mu)

  def run(x0, throw=False, **kw):
    options = dict(
      mus=jnp.array([0.1, 0.05], x0.dtype),
      epsilon=0.05,
      optimizer=optax.sgd(0.1),
      inner_steps=50,
      outer_steps=10,
      rho=1.0,
      rho_max=10.0,
    )
    options.update(kw)
    return value.solve_vfp(f, g, value_fn, x0, jnp.zeros(2, x0.dtype), throw=throw, **options)

  def make(dtype):
    def fn(x, throw=False):
      sol = run(x, throw)
      return _status_and(sol, sol.x, sol.y, sol.lam)

    x0 = jnp.array([0.3, -0.2], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 0.3, 3, dtype=dtype)[:, None]

  def failing(throw):  # one inner step: far from stationary
    return run(jnp.array([3.0, -2.0]), throw, inner_steps=1, outer_steps=1, kkt_tol=1e-8)

  def bad():
    run(jnp.array([0.3, -0.2]), epsilon=-1.0)

  return Case(make, failing, Status.NOT_STATIONARY, bad, ValueError, "`epsilon`", rtol32=1e-2)


def _gradient_sampling_case(sqp):
  fun = lambda x, alpha, beta: jnp.sum(jnp.abs(x - 1.0)) + 0.1 * jnp.sum(x**2)
  # Inactive at the solution: with an active constraint the dual FISTA of
  # (5.5) stops at qp_max_steps near the end (INNER_FAILED), see test_gradient_sampling.
  constraints = lambda x: jnp.array([x[0] - 3.0])
  targets = dict(eps_opt=1e-2, alpha_opt=1e-2, beta_opt=1e-2)

  def run(x0, throw=False, **kw):
    options = dict(key=jax.random.PRNGKey(0), num_samples=3, max_steps=300, throw=throw)
    if sqp:
      options.update(eps0=0.1, alpha0=0.1, beta0=0.1, **targets)
      options.update(kw)
      return upper.sqp_gradient_sampling(fun, constraints, x0, **options)
    options.update(eta_opt=1e-2, **targets)
    options.update(kw)
    return upper.gradient_sampling(fun, x0, **options)

  def make(dtype):
    def fn(x, throw=False):
      sol = run(x, throw)
      return _status_and(sol, sol.x, sol.value)

    x0 = jnp.array([2.0, -1.0], dtype)
    return fn, x0, x0[None] + jnp.linspace(0.0, 0.5, 3, dtype=dtype)[:, None]

  def failing(throw):
    return run(jnp.array([2.0, -1.0]), throw, max_steps=2)

  def bad():
    run(jnp.array([2.0, -1.0]), num_samples=1)

  return Case(make, failing, Status.MAX_STEPS, bad, ValueError, "`num_samples`", rtol32=2e-2)


CASES = {
  "bda": _bda_case(0.5),
  "rhg": _bda_case(0.0),
  "implicit": _implicit_case(),
  "composite": _composite_case(),
  "value.quadratic": _quadratic_case(),
  "value.entropic": _entropic_case(),
  "value.solve_vfp": _vfp_case(),
  "upper.gradient_sampling": _gradient_sampling_case(sqp=False),
  "upper.sqp_gradient_sampling": _gradient_sampling_case(sqp=True),
}
NAMES = sorted(CASES)


@functools.cache
def _jitted(name):
  """The jitted float64 function (which fails if traced twice), x0, xs, and its
  outputs at each row of xs (the loop that vmap must equal)."""
  fn, x0, xs = CASES[name].make(jnp.float64)
  chex.clear_trace_counter()  # chex counts per source and call stack
  jitted = jax.jit(chex.assert_max_traces(fn, n=1))
  loop = [jitted(x) for x in xs]  # new values, same shapes: no retrace
  return fn, jitted, x0, xs, loop


# jit against eager and vmap against a loop agree to rounding, not bit for bit:
# XLA may fuse, reorder and batch the same float64 arithmetic differently
# (and differently in each jax version; at the floor, jax 0.6.2, the
# gradient-sampling SQP's vmap differs from its loop by 3e-12 after its
# iterations). 1e-10 is a hundred times that, and far below any solver
# tolerance, so a real difference (a wrong batch axis, a leaked tracer) fails.
ROUNDING = 1e-10


def _close(a, b, rtol=ROUNDING, atol=ROUNDING):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_eager_and_does_not_retrace(name):
  fn, jitted, x0, _, loop = _jitted(name)
  status, eager = fn(x0)
  jit_status, jit_out = jitted(x0)  # a fourth call: still one trace
  assert int(status) == int(jit_status) == Status.SUCCESS
  _close(jit_out, eager)
  assert all(int(s) == Status.SUCCESS for s, _ in loop)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_a_loop(name):
  fn, _, _, xs, loop = _jitted(name)
  statuses, batched = jax.jit(jax.vmap(fn))(xs)
  for i, (_, expected) in enumerate(loop):
    _close(jax.tree_util.tree_map(lambda a: a[i], batched), expected)
  np.testing.assert_array_equal(statuses, Status.SUCCESS)


@pytest.mark.parametrize("name", NAMES)
def test_float32_stays_float32_and_agrees(name):
  fn, x0, _ = CASES[name].make(jnp.float32)
  status, outputs = jax.jit(fn)(x0)
  assert int(status) == Status.SUCCESS
  for leaf in jax.tree_util.tree_leaves(outputs):
    assert leaf.dtype == jnp.float32, leaf.dtype
  _, jitted64, x64, _, _ = _jitted(name)
  _close(
    jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), outputs),
    jitted64(x64)[1],
    rtol=CASES[name].rtol32,
    atol=CASES[name].rtol32,
  )


@pytest.mark.parametrize("name", NAMES)
def test_failure_is_a_status_and_throw_raises(name):
  case = CASES[name]
  solution = case.failing(False)
  for field in ("num_steps", "status"):  # the core fields of every info
    assert isinstance(getattr(solution.info, field), jax.Array), field
  assert solution.info.status.dtype == jnp.int32
  assert int(solution.info.status) == case.failure
  with pytest.raises(SolverError, match=Status(case.failure).name):
    case.failing(True)  # eagerly: at once
  with pytest.raises(Exception, match=Status(case.failure).name):
    jax.block_until_ready(jax.jit(lambda: case.failing(True).info.status)())


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_names_its_argument(name):
  case = CASES[name]
  with pytest.raises(case.error, match=case.match):
    case.bad_input()


# --------------------------------------------------------------- drivers
def test_optimize_status_throw_and_bad_input():
  hg = implicit.make_hypergradient(_upper, _lower, solver="gd", stepsize=1e-3, max_steps=2)
  res = upper.optimize(hg, jnp.ones(3), optax.sgd(0.1), steps=2, y0=jnp.zeros(3))
  assert int(res.info.status) == Status.INNER_FAILED
  assert int(res.info.inner_status) == Status.MAX_STEPS
  with pytest.raises(SolverError, match="INNER_FAILED"):
    upper.optimize(hg, jnp.ones(3), optax.sgd(0.1), steps=1, y0=jnp.zeros(3), throw=True)
  with pytest.raises(TypeError, match="`optimizer`"):
    upper.optimize(hg, jnp.ones(3), "sgd", steps=1, y0=jnp.zeros(3))
