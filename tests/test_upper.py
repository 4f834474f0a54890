"""The Optax upper loop: convergence, projection, warm start, checkpoints."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import SolverError, Status, bda, implicit, projections, schedules, upper
from bilevel_jax.problems import example1, make_quadratic


@pytest.fixture(scope="module")
def quad():
  return make_quadratic(jax.random.PRNGKey(0), dim_x=3, dim_y=6, condition=5.0, rho=0.5)


def _hg(quad, steps=150):
  return bda.make_hypergradient(
    quad.upper,
    quad.lower,
    steps=steps,
    upper_lr=0.5,
    lower_lr=float(1 / quad.lower_smoothness()),
    alpha=0.0,
  )


def test_converges_to_closed_form_minimizer(quad):
  J = jnp.linalg.solve(quad.A, quad.B)
  x_star = jnp.linalg.solve(J.T @ J + quad.rho * jnp.eye(3), J.T @ quad.c)
  res = upper.optimize(_hg(quad), jnp.zeros(3), optax.adam(0.05), steps=600, y0=jnp.zeros(6))
  assert res.info.status == Status.SUCCESS
  np.testing.assert_allclose(res.x, x_star, atol=1e-5)
  assert res.history["value"].shape == (600,)
  assert res.history["step_time"].min() > 0
  assert res.history["value"][-1] <= res.history["value"][0]


def test_plain_hypergradient_fn_without_y0(quad):
  fn = jax.jit(
    lambda x: bda.hypergradient(
      quad.upper, quad.lower, x, jnp.zeros(6), steps=100, upper_lr=0.5, lower_lr=0.1, alpha=0.0
    )
  )
  res = upper.optimize(fn, jnp.zeros(3), optax.sgd(0.1), steps=5)
  assert res.y is None and res.info.num_steps == 5


def test_projection_keeps_x_feasible():
  hg = bda.make_hypergradient(
    lambda x, y: -jnp.sum(x) + jnp.sum(y**2),
    lambda x, y: jnp.sum((y - x) ** 2),
    steps=5,
    upper_lr=0.1,
    lower_lr=0.1,
    alpha=0.0,
  )
  res = upper.optimize(
    hg,
    jnp.zeros(2),
    optax.sgd(1.0),
    steps=20,
    y0=jnp.zeros(2),
    projection=projections.box(-0.5, 0.25),
  )
  assert np.all(np.asarray(res.x) <= 0.25 + 1e-12) and np.all(np.asarray(res.x) >= -0.5)


def test_example1_bda_reaches_x_star_and_rhg_does_not():
  """Section 5.1: BDA approaches x* = 1 (closer as K grows); RHG stays ~0.5 away."""

  def run(K, alpha):
    hg = bda.make_hypergradient(
      example1.upper, example1.lower, steps=K, upper_lr=0.7, lower_lr=0.2, alpha=alpha
    )
    return upper.optimize(
      hg,
      jnp.asarray(0.0),
      optax.sgd(0.5),
      steps=100,
      y0=jnp.array([2.0, 2.0]),
      projection=example1.projection(),
      metrics_fn=example1.metrics,
    )

  bda_err = [abs(float(run(K, schedules.harmonic(0.5)).x) - 1) for K in (8, 16, 64)]
  rhg_err = [abs(float(run(K, 0.0).x) - 1) for K in (8, 16, 64)]
  assert bda_err[0] > bda_err[1] > bda_err[2], bda_err
  assert bda_err[2] < 0.05, bda_err
  assert min(rhg_err) > 0.45, rhg_err
  best = run(64, schedules.harmonic(0.9))
  assert abs(float(best.x) - 1) < 5e-3
  assert best.history["y_err"][-1] < 1e-3


def test_warm_start_feeds_y_back(quad):
  res = upper.optimize(
    _hg(quad, steps=3), jnp.zeros(3), optax.sgd(0.0), steps=40, y0=jnp.zeros(6), warm_start=True
  )
  # With x fixed (lr 0), 40 warm-started rounds of 3 steps = 120 lower steps.
  np.testing.assert_allclose(res.y, quad.solution(jnp.zeros(3)), atol=1e-8)
  cold = upper.optimize(_hg(quad, steps=3), jnp.zeros(3), optax.sgd(0.0), steps=2, y0=jnp.ones(6))
  assert not np.allclose(cold.y, quad.solution(jnp.zeros(3)), atol=1e-3)


def test_resume_from_checkpoint_equals_uninterrupted_run(quad, tmp_path):
  path = str(tmp_path / "run.npz")
  full = upper.optimize(
    _hg(quad), jnp.zeros(3), optax.adam(0.05), steps=20, y0=jnp.zeros(6), warm_start=True
  )
  first = upper.optimize(
    _hg(quad),
    jnp.zeros(3),
    optax.adam(0.05),
    steps=12,
    y0=jnp.zeros(6),
    warm_start=True,
    checkpoint_path=path,
    checkpoint_every=5,
  )
  assert first.info.num_steps == 12
  second = upper.optimize(
    _hg(quad),
    jnp.zeros(3),
    optax.adam(0.05),
    steps=20,
    y0=jnp.zeros(6),
    warm_start=True,
    checkpoint_path=path,
    checkpoint_every=5,
  )
  assert second.info.resumed_from == 12
  np.testing.assert_allclose(second.x, full.x, rtol=1e-12)
  np.testing.assert_allclose(second.history["value"], full.history["value"], rtol=1e-12)


class _InterruptingLog(io.StringIO):
  """A progress stream that raises KeyboardInterrupt on its n-th line."""

  def __init__(self, n):
    super().__init__()
    self.n = n

  def write(self, text):
    if text.strip():
      self.n -= 1
      if self.n == 0:
        raise KeyboardInterrupt
    return super().write(text)


def test_interrupted_run_leaves_a_resumable_checkpoint(quad, tmp_path):
  path = str(tmp_path / "run.npz")
  kw = dict(steps=15, y0=jnp.zeros(6), checkpoint_path=path, checkpoint_every=100)
  with pytest.raises(KeyboardInterrupt):
    upper.optimize(
      _hg(quad), jnp.zeros(3), optax.adam(0.05), log_every=1, log=_InterruptingLog(7), **kw
    )
  resumed = upper.optimize(_hg(quad), jnp.zeros(3), optax.adam(0.05), **kw)
  assert resumed.info.resumed_from == 7
  full = upper.optimize(_hg(quad), jnp.zeros(3), optax.adam(0.05), steps=15, y0=jnp.zeros(6))
  np.testing.assert_allclose(resumed.x, full.x, rtol=1e-12)
  assert resumed.history["value"].shape == (15,)


@pytest.mark.parametrize(
  "second_optimizer, second_steps, match",
  [
    (optax.adam(0.1), 4, "is not a checkpoint of this run: `opt_state`"),  # another run
    (optax.sgd(0.1), 2, "beyond `steps` = 2"),  # further along than asked
  ],
)
def test_unusable_checkpoint_is_rejected(quad, tmp_path, second_optimizer, second_steps, match):
  path = str(tmp_path / "run.npz")
  upper.optimize(
    _hg(quad), jnp.zeros(3), optax.sgd(0.1), steps=3, y0=jnp.zeros(6), checkpoint_path=path
  )
  with pytest.raises(ValueError, match=match):
    upper.optimize(
      _hg(quad),
      jnp.zeros(3),
      second_optimizer,
      steps=second_steps,
      y0=jnp.zeros(6),
      checkpoint_path=path,
    )


def test_nonfinite_stops_and_is_reported():
  fn = jax.jit(lambda x: (jnp.log(x - 1.0).sum(), jnp.ones_like(x)))
  res = upper.optimize(fn, jnp.array([3.0]), optax.sgd(1.0), steps=10)
  assert res.info.status == Status.NONFINITE
  assert np.isfinite(np.asarray(res.x)).all()
  assert res.info.num_steps < 10


def test_progress_lines(quad):
  log = io.StringIO()
  upper.optimize(
    _hg(quad), jnp.zeros(3), optax.sgd(0.1), steps=4, y0=jnp.zeros(6), log_every=2, log=log
  )
  lines = log.getvalue().strip().splitlines()
  assert len(lines) == 2 and "upper step" in lines[0] and "ms/step" in lines[0]


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"steps": 0}, ValueError, "`steps` must be positive"),
    ({"optimizer": "adam"}, TypeError, "`optimizer` must be an optax"),
    ({"warm_start": True, "y0": None}, ValueError, "`warm_start=True` needs `y0`"),
  ],
)
def test_bad_input(quad, kwargs, error, match):
  args = dict(steps=3, y0=jnp.zeros(6))
  args.update(kwargs)
  optimizer = args.pop("optimizer", optax.sgd(0.1))
  with pytest.raises(error, match=match):
    upper.optimize(_hg(quad), jnp.zeros(3), optimizer, **args)


def test_resuming_a_finished_run_returns_its_last_y(quad, tmp_path):
  path = str(tmp_path / "run.npz")
  first = upper.optimize(
    _hg(quad), jnp.zeros(3), optax.sgd(0.1), steps=4, y0=jnp.ones(6), checkpoint_path=path
  )
  again = upper.optimize(
    _hg(quad), jnp.zeros(3), optax.sgd(0.1), steps=4, y0=jnp.ones(6), checkpoint_path=path
  )
  assert again.info.resumed_from == 4
  np.testing.assert_allclose(again.y, first.y, rtol=1e-12)
  np.testing.assert_allclose(again.x, first.x, rtol=1e-12)


# --------------------------------------------------------- inner failures
def _capped_ridge(max_steps):
  """Per-feature L2 weights by implicit differentiation, the lower L-BFGS
  capped at ``max_steps``: too few steps is a lower failure (MAX_STEPS)."""
  a = jax.random.normal(jax.random.PRNGKey(3), (30, 5))
  b = a @ jnp.arange(1.0, 6.0)
  lower = lambda lam, w: 0.5 * jnp.sum((a @ w - b) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)
  upper_fn = lambda lam, w: 0.5 * jnp.sum((w - 1.0) ** 2)
  return implicit.make_hypergradient(upper_fn, lower, max_steps=max_steps)


def test_inner_failure_is_recorded_in_history_and_status():
  res = upper.optimize(_capped_ridge(2), jnp.zeros(5), optax.sgd(0.01), steps=4, y0=jnp.zeros(5))
  assert res.info.num_steps == 4  # the run goes on by default
  np.testing.assert_array_equal(res.history["lower_status"], Status.MAX_STEPS)
  assert np.all(res.history["lower_residual"] > 1e-8)
  assert res.info.status == Status.INNER_FAILED
  assert res.info.inner_status == Status.MAX_STEPS and res.info.inner_failures == 4
  ok = upper.optimize(_capped_ridge(500), jnp.zeros(5), optax.sgd(0.01), steps=2, y0=jnp.zeros(5))
  assert ok.info.status == Status.SUCCESS and ok.info.inner_failures == 0


def test_stop_on_inner_failure_and_throw():
  res = upper.optimize(
    _capped_ridge(2),
    jnp.zeros(5),
    optax.sgd(0.01),
    steps=4,
    y0=jnp.zeros(5),
    stop_on_inner_failure=True,
  )
  assert res.info.num_steps == 0 and res.history["lower_status"].shape == (1,)
  with pytest.raises(SolverError, match="INNER_FAILED"):
    upper.optimize(
      _capped_ridge(2), jnp.zeros(5), optax.sgd(0.01), steps=1, y0=jnp.zeros(5), throw=True
    )
