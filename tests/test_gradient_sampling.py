"""Gradient sampling (Algorithms 1 and 2) and their small QPs."""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import composite
from bilevel_jax import upper
from bilevel_jax._src import minnorm
from bilevel_jax._src.status import SolverError
from bilevel_jax._src.status import Status


def _brute_min_norm(points):
  """Min-norm point of the hull by enumerating supports (affine min-norm
  point of each subset, kept when its weights are >= 0)."""
  best = None
  n = points.shape[0]
  for size in range(1, n + 1):
    for subset in itertools.combinations(range(n), size):
      pts = points[list(subset)]
      gram = pts @ pts.T
      kkt = np.block([[gram, -np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
      try:
        sol = np.linalg.solve(kkt, np.concatenate([np.zeros(size), [1.0]]))
      except np.linalg.LinAlgError:
        continue
      weights = sol[:size]
      if np.all(weights >= -1e-12):
        norm = np.linalg.norm(pts.T @ weights)
        if best is None or norm < best:
          best = norm
  return best


@pytest.mark.parametrize("seed,num,dim", [(0, 6, 3), (1, 5, 2), (2, 7, 4), (3, 4, 6)])
def test_min_norm_matches_brute_force(seed, num, dim):
  rng = np.random.default_rng(seed)
  points = rng.normal(size=(num, dim)) + (0.5 if seed % 2 else 0.0)
  result = jax.jit(upper.min_norm_hull)(jnp.asarray(points))
  assert float(jnp.linalg.norm(result.point)) == pytest.approx(
    _brute_min_norm(points), rel=1e-9, abs=1e-12
  )
  np.testing.assert_allclose(jnp.sum(result.weights), 1.0, atol=1e-12)
  assert np.all(np.asarray(result.weights) >= 0)
  # Optimality: <w, w_i> >= |w|^2 for every point.
  w = np.asarray(result.point)
  assert np.all(points @ w >= w @ w - 1e-10)


def test_sqp_direction_against_min_norm():
  # With no constraints (r = 0) and rho = 1, (5.5)'s d is minus the min-norm
  # element of the hull of the sampled gradients.
  rng = np.random.default_rng(4)
  grads = jnp.asarray(rng.normal(size=(6, 3)) + 0.3)
  qp = minnorm.sqp_direction(
    jnp.asarray(1.0), grads, jnp.zeros(0), jnp.zeros((0, 6, 3)), jnp.asarray(1.0)
  )
  np.testing.assert_allclose(qp.direction, -upper.min_norm_hull(grads).point, atol=1e-6)
  assert float(qp.model_value - qp.dual_value) <= 1e-8 * (1 + abs(float(qp.model_value)))
  assert int(qp.info.status) == Status.SUCCESS
  capped = minnorm.sqp_direction(
    jnp.asarray(1.0), grads, jnp.zeros(0), jnp.zeros((0, 6, 3)), jnp.asarray(1.0), max_steps=2
  )
  assert int(capped.info.status) == Status.MAX_STEPS and int(capped.info.num_steps) == 2


def test_min_norm_status_and_throw():
  points = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)))
  assert int(upper.min_norm_hull(points).info.status) == Status.SUCCESS
  capped = upper.min_norm_hull(points, max_steps=1)
  assert int(capped.info.status) == Status.MAX_STEPS and float(capped.info.gap) > 0
  with pytest.raises(SolverError, match="MAX_STEPS"):
    upper.min_norm_hull(points, max_steps=1, throw=True)


def _nonsmooth(x, alpha, beta):
  del alpha, beta
  return jnp.abs(x[0] - 1.0) + 2.0 * jnp.abs(x[1] + 0.5) + 0.1 * jnp.sum(x**2)


def test_gradient_sampling_finds_the_kink_and_vmaps():
  run = jax.jit(
    jax.vmap(
      lambda x0, key: upper.gradient_sampling(_nonsmooth, x0, key=key, num_samples=4, max_steps=300)
    )
  )
  x0 = jnp.array([[3.0, 2.0], [-2.0, -3.0]])
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  result = run(x0, keys)
  # The minimizer of |x0 - 1| + 2|x1 + 0.5| + 0.1|x|^2 is (1, -0.5).
  np.testing.assert_allclose(result.x, [[1.0, -0.5]] * 2, atol=1e-3)
  assert np.all(np.asarray(result.info.status) == Status.SUCCESS)
  assert np.all(np.asarray(result.info.target_hits) >= 17)
  values = np.asarray(result.info.history.value[0])
  values = values[np.isfinite(values)]
  assert np.all(np.diff(values) <= 1e-12)  # monotone decrease of f


def test_gradient_sampling_on_example_5_5():
  # min y^2 s.t. y solves (5.3): the only stationary point is x = 0 even
  # though the actual lower level is infeasible for x > 50.5.
  h = composite.nonpositive(2)
  g = lambda x, y: y[0] ** 2 + x[0] * y[0]
  G = lambda x, y: jnp.array([x[0] + y[0] - 1, x[0] - y[0] - 100])

  def fun(x, alpha, beta):  # the value and the lower solution, whose status is read
    sol = composite.solve(g, G, h, x, jnp.zeros(1), alpha=alpha, beta=beta)
    return sol.y[0] ** 2, sol

  result = jax.jit(
    lambda x0: upper.gradient_sampling(
      fun, x0, key=jax.random.PRNGKey(1), num_samples=3, max_steps=400
    )
  )(jnp.array([70.0]))
  assert abs(float(result.x[0])) < 1e-3
  assert int(result.info.status) == Status.SUCCESS
  assert int(result.info.inner_status) == Status.SUCCESS and int(result.info.inner_failures) == 0
  steps = int(result.info.num_steps)
  np.testing.assert_array_equal(result.info.history.inner_status[:steps], Status.SUCCESS)


def test_sqp_gradient_sampling_constrained():
  # min |x - c|_1 + |x|^2/10 s.t. |x|^2 <= 1 with c outside the ball.
  c = jnp.array([2.0, 1.0])

  def fun(x, alpha, beta):
    del alpha, beta
    return jnp.sum(jnp.abs(x - c)) + 0.1 * jnp.sum(x**2)

  result = jax.jit(
    lambda x0: upper.sqp_gradient_sampling(
      fun,
      lambda x: jnp.sum(x**2) - 1.0,
      x0,
      key=jax.random.PRNGKey(2),
      num_samples=4,
      rho0=1.0,
      eps0=0.1,
      eps_opt=1e-4,
      eta=1.0,
      max_steps=500,
    )
  )(jnp.zeros(2))
  x = np.asarray(result.x)
  # Solution: on the unit circle where the gradient of the objective, (-1, -1)
  # + 0.2 x, is normal to the circle: x = (1, 1)/sqrt(2).
  np.testing.assert_allclose(x, [2**-0.5, 2**-0.5], atol=5e-3)
  assert float(np.sum(x**2)) - 1.0 < 1e-3


def test_bad_arguments():
  with pytest.raises(ValueError, match="`num_samples`"):
    upper.gradient_sampling(_nonsmooth, jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=2)
  with pytest.raises(ValueError, match="`mu_eps`"):
    upper.gradient_sampling(
      _nonsmooth, jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=3, mu_eps=1.5
    )
  with pytest.raises(ValueError, match="`eta0`"):
    upper.gradient_sampling(
      _nonsmooth, jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=3, eta0=0.0
    )
  with pytest.raises(ValueError, match="`constraints`"):
    upper.sqp_gradient_sampling(
      _nonsmooth, lambda x: jnp.ones((2, 2)), jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=3
    )


def test_fixed_radius_mu_eps_one():
  # Theorem 5.7: mu_eps = 1 keeps eps = eps0; with eps_opt = eps0 the run
  # stops once |w| <= eta_opt with alpha, beta at their targets, at an
  # eps-stationary point: 0 in the hull of the gradients over B(x, eps),
  # which for this f puts the minimizer (1, -0.5) within eps of x.
  run = jax.jit(
    lambda eps_opt: upper.gradient_sampling(
      _nonsmooth,
      jnp.array([3.0, 2.0]),
      key=jax.random.PRNGKey(0),
      num_samples=4,
      eps0=0.1,
      eps_opt=eps_opt,
      mu_eps=1.0,
      max_steps=400,
    )
  )
  result = run(0.1)
  assert int(result.info.status) == Status.SUCCESS
  steps = int(result.info.num_steps)
  np.testing.assert_array_equal(result.info.history.eps[:steps], 0.1)
  assert float(result.info.eps) == 0.1
  assert int(result.info.target_hits) >= 17  # alpha: 1 -> 1e-5 by halves
  assert float(result.info.alpha) <= 1e-5 and float(result.info.stationarity) <= 1e-5
  assert np.max(np.abs(np.asarray(result.x) - np.array([1.0, -0.5]))) <= 0.1
  # eps_opt < eps0 with a fixed radius: the rule never holds, MAX_STEPS.
  capped = run(0.01)
  assert int(capped.info.status) == Status.MAX_STEPS and int(capped.info.num_steps) == 400
  assert float(capped.info.eps) == 0.1


@pytest.mark.parametrize("mu", [0.0, -0.5, 1.5, 1.0 + 1e-12])
def test_mu_eps_outside_zero_one_closed_is_rejected(mu):
  with pytest.raises(ValueError, match=r"`mu_eps` must lie in \(0, 1\]"):
    upper.gradient_sampling(
      _nonsmooth, jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=3, mu_eps=mu
    )
  # Traced: no iteration, INVALID_INPUT; 1 itself is valid.
  traced = jax.jit(
    lambda m: (
      upper.gradient_sampling(
        _nonsmooth, jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=3, mu_eps=m, max_steps=2
      ).info
    )
  )
  info = traced(mu)
  assert int(info.status) == Status.INVALID_INPUT and int(info.num_steps) == 0
  assert int(traced(1.0).status) != Status.INVALID_INPUT


def test_mu_one_only_for_the_radius_of_algorithm_1():
  key = jax.random.PRNGKey(0)
  for name in ("mu_alpha", "mu_beta", "mu_eta"):
    with pytest.raises(ValueError, match=rf"`{name}` must lie in \(0, 1\)"):
      upper.gradient_sampling(_nonsmooth, jnp.zeros(2), key=key, num_samples=3, **{name: 1.0})
  with pytest.raises(ValueError, match=r"`mu_eps` must lie in \(0, 1\)"):
    upper.sqp_gradient_sampling(
      _nonsmooth, lambda x: x[0] - 1.0, jnp.zeros(2), key=key, num_samples=3, mu_eps=1.0
    )


def _example_5_5_lower():
  h = composite.nonpositive(2)
  g = lambda x, y: y[0] ** 2 + x[0] * y[0]
  G = lambda x, y: jnp.array([x[0] + y[0] - 1, x[0] - y[0] - 100])
  return g, G, h


def test_gradient_sampling_with_a_warm_state():
  # fun carries the lower-level solution as its state (method="warm"), the
  # samples one after another: the same stationary point x = 0 as the
  # stateless run of test_gradient_sampling_on_example_5_5.
  g, G, h = _example_5_5_lower()

  def fun(x, alpha, beta, y):
    sol = composite.solve(g, G, h, x, y, alpha=alpha, beta=beta, method="warm")
    return sol.y[0] ** 2, sol.y

  result = jax.jit(
    lambda x0: upper.gradient_sampling(
      fun,
      x0,
      key=jax.random.PRNGKey(1),
      num_samples=3,
      max_steps=400,
      state0=jnp.zeros(1),
      batching="map",
    )
  )(jnp.array([70.0]))
  assert abs(float(result.x[0])) < 1e-3
  assert int(result.info.status) == Status.SUCCESS


def test_stateful_fun_and_batching_are_checked():
  with pytest.raises(TypeError, match=r"\(value, state\)"):
    upper.gradient_sampling(
      lambda x, a, b, s: jnp.sum(x**2),
      jnp.zeros(2),
      key=jax.random.PRNGKey(0),
      num_samples=3,
      state0=jnp.zeros(1),
    )
  with pytest.raises(ValueError, match="`batching`"):
    upper.gradient_sampling(
      _nonsmooth, jnp.zeros(2), key=jax.random.PRNGKey(0), num_samples=3, batching="pmap"
    )


class _Info(NamedTuple):
  status: jax.Array


class _Lower(NamedTuple):
  info: _Info


def test_gradient_sampling_reports_a_failed_lower_solve():
  # fun's aux reports MAX_STEPS (as a composite solution capped at too few
  # steps does). The run stops at once (early_stop, eta0 large): its own
  # status would be SUCCESS, the inner failure makes it INNER_FAILED, and
  # the history has it.
  def fun(x, alpha, beta):
    return jnp.sum(x**2), _Lower(_Info(jnp.asarray(Status.MAX_STEPS, jnp.int32)))

  result = upper.gradient_sampling(
    fun,
    jnp.array([2.0]),
    key=jax.random.PRNGKey(0),
    num_samples=2,
    eta0=1e6,
    early_stop=True,
    max_steps=3,
  )
  info = result.info
  assert int(info.num_steps) == 1 and int(info.status) == Status.INNER_FAILED
  assert int(info.inner_status) == Status.MAX_STEPS
  assert int(info.inner_failures) == 2  # the iteration and the final evaluation
  np.testing.assert_array_equal(info.history.inner_status, [Status.MAX_STEPS, -1, -1])
  with pytest.raises(SolverError, match="INNER_FAILED"):
    upper.gradient_sampling(
      fun,
      jnp.array([2.0]),
      key=jax.random.PRNGKey(0),
      num_samples=2,
      eta0=1e6,
      early_stop=True,
      max_steps=3,
      throw=True,
    )


def test_sqp_gradient_sampling_reports_inner_failures():
  # max x s.t. x <= 1 from x = 0, with an aux whose status is MAX_STEPS where
  # x > 0.5: the iterations that sample there record it, the others do not.
  def fun(x, alpha, beta):
    failed = x[0] > 0.5
    return -x[0], _Lower(_Info(jnp.where(failed, Status.MAX_STEPS, Status.SUCCESS)))

  info = jax.jit(
    lambda: upper.sqp_gradient_sampling(
      fun,
      lambda x: x - 1.0,
      jnp.array([0.0]),
      key=jax.random.PRNGKey(0),
      num_samples=2,
      rho0=0.5,
      max_steps=300,
    )
  )().info
  steps = int(info.num_steps)
  inner = np.asarray(info.history.inner_status)
  assert int(info.status) == Status.INNER_FAILED and int(info.inner_status) == Status.MAX_STEPS
  assert inner[0] == Status.SUCCESS and np.any(inner[:steps] == Status.MAX_STEPS)
  assert np.all(inner[steps:] == -1)
  assert int(info.inner_failures) == np.sum(inner[:steps] == Status.MAX_STEPS) + 1


@pytest.mark.parametrize("sqp", [False, True])
def test_fun_is_traced_once_into_the_loop(sqp):
  # Compile time (issue 15): fun enters the program once forward (f at the
  # iterate, the line-search trials and the final value share one while
  # loop) and once with its gradient (the samples); the argument check's
  # abstract evaluation is the third trace and adds nothing to the program.
  traces = []

  def fun(x, alpha, beta):
    traces.append(1)
    return jnp.sum(jnp.abs(x - 1.0)) + alpha * jnp.sum(x**2)

  kw = dict(key=jax.random.PRNGKey(0), num_samples=3, max_steps=5)
  if sqp:
    run = lambda x: upper.sqp_gradient_sampling(fun, lambda x: x - 3.0, x, **kw)
  else:
    run = lambda x: upper.gradient_sampling(fun, x, **kw)
  jax.jit(run).trace(jnp.array([2.0, -1.0]))
  assert len(traces) == 3
