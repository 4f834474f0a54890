"""upper.make_step (the step the user owns) and optimize's per-step data,
callback and progress bar, which are a loop over it."""

import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bilevel_jax import Status, implicit, upper

# Lower: y*(lam; t) = t / (1 + lam) for a target t that changes each step (the
# "batch"); upper: |y* - 0.25|^2 / 2, minimized at lam = 4 t - 1 (= 3 for t = 1).
f = lambda lam, y, target: 0.5 * jnp.sum((y - target) ** 2) + 0.5 * lam * jnp.sum(y**2)
F = lambda lam, y: 0.5 * jnp.sum((y - 0.25) ** 2)


def hg(lam, y0, target):
  return implicit.hypergradient(
    F, lambda l, y: f(l, y, target), lam, y0, return_info=True, solver="newton"
  )


def closed_form_grad(lam, target):
  y = target / (1 + lam)
  return jnp.sum((y - 0.25) * (-target / (1 + lam) ** 2))


def test_step_is_pure_jits_once_and_applies_the_optimizer():
  stepper = upper.make_step(hg, optax.sgd(0.5))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, target):
    return stepper.step(state, target=target)

  state = stepper.init(1.0, jnp.zeros(2))
  targets = jnp.linspace(0.8, 1.2, 5)
  lam = 1.0
  for t in targets:
    state, info = step(state, jnp.full(2, t))
    g = closed_form_grad(lam, jnp.full(2, t))
    np.testing.assert_allclose(info.grad_norm, jnp.abs(g), rtol=1e-8)
    lam = lam - 0.5 * g
    np.testing.assert_allclose(state.x, lam, rtol=1e-8)
    assert int(info.status) == Status.SUCCESS and int(info.lower_status) == Status.SUCCESS
  assert int(state.step) == 5


def test_step_vmaps_over_tasks():
  stepper = upper.make_step(hg, optax.adam(0.1))
  lams = jnp.array([0.5, 1.0, 2.0])
  states = jax.vmap(stepper.init)(lams, jnp.zeros((3, 2)))
  targets = jnp.array([[1.0, 1.0], [0.5, 0.5], [2.0, 2.0]])
  step = jax.jit(jax.vmap(lambda s, t: stepper.step(s, target=t)))
  for _ in range(3):
    states, infos = step(states, targets)
  for i in range(3):
    single = stepper.init(lams[i], jnp.zeros(2))
    for _ in range(3):
      single, _ = stepper.step(single, target=targets[i])
    np.testing.assert_allclose(states.x[i], single.x, rtol=1e-10)
  assert infos.status.shape == (3,)


def test_step_reports_nonfinite_and_inner_failures():
  stepper = upper.make_step(lambda lam, y0, target: hg(lam * jnp.nan, y0, target), optax.sgd(0.1))
  _, info = stepper.step(stepper.init(1.0, jnp.zeros(2)), target=jnp.ones(2))
  assert int(info.status) == Status.NONFINITE

  def capped(lam, y0, target):
    return implicit.hypergradient(
      F,
      lambda l, y: f(l, y, target),
      lam,
      y0,
      return_info=True,
      solver="gd",
      stepsize=1e-3,
      max_steps=2,
    )

  stepper = upper.make_step(capped, optax.sgd(0.1))
  _, info = stepper.step(stepper.init(1.0, jnp.zeros(2)), target=jnp.ones(2))
  assert int(info.status) == Status.INNER_FAILED and int(info.lower_status) == Status.MAX_STEPS


def test_warm_start_and_metrics_and_projection():
  stepper = upper.make_step(
    hg,
    optax.sgd(100.0),
    warm_start=True,
    projection=lambda lam: jnp.clip(lam, 0.0, 2.0),
    metrics_fn=lambda lam, y: {"y0": y[0]},
  )
  state = stepper.init(1.0, jnp.zeros(2))
  state, info = stepper.step(state, target=jnp.ones(2))
  np.testing.assert_allclose(state.y0, jnp.full(2, 0.5), rtol=1e-8)  # y*(1) = 1/2
  np.testing.assert_allclose(info.metrics["y0"], 0.5, rtol=1e-8)
  assert 0.0 <= float(state.x) <= 2.0
  with pytest.raises(ValueError, match="`warm_start=True` needs `y0`"):
    stepper.init(1.0)
  with pytest.raises(TypeError, match="`optimizer`"):
    upper.make_step(hg, "sgd")


def test_optimize_draws_new_data_every_step_and_resumes_the_same_stream(tmp_path):
  def sample(t, key):
    return {"target": 1.0 + 0.05 * jax.random.normal(key, (2,))}

  kw = dict(steps=40, y0=jnp.zeros(2), data=sample, key=jax.random.PRNGKey(3))
  full = upper.optimize(hg, 1.0, optax.sgd(5.0), **kw)
  assert int(full.info.status) == Status.SUCCESS
  assert 2.0 < float(full.x) < 4.0  # near lam = 4 t - 1 with t ~ 1
  # The same run, interrupted after 15 steps and resumed: the sampler is
  # keyed by the step, so the resumed run sees the same data.
  path = str(tmp_path / "run.npz")
  upper.optimize(hg, 1.0, optax.sgd(5.0), checkpoint_path=path, **{**kw, "steps": 15})
  resumed = upper.optimize(hg, 1.0, optax.sgd(5.0), checkpoint_path=path, **kw)
  assert int(resumed.info.resumed_from) == 15
  np.testing.assert_allclose(resumed.x, full.x, rtol=1e-12)
  np.testing.assert_allclose(resumed.history["value"], full.history["value"], rtol=1e-12)


def test_optimize_with_an_iterator_a_dict_callback_and_progress():
  loader = ({"target": jnp.full(2, 1.0 + 0.01 * t)} for t in range(1000))
  seen, log = [], io.StringIO()
  sol = upper.optimize(
    hg,
    1.0,
    optax.sgd(5.0),
    steps=20,
    y0=jnp.zeros(2),
    data=loader,
    callback=lambda t, state, info: seen.append((t, float(info.value))),
    callback_every=5,
    progress=True,
    log=log,
  )
  assert [t for t, _ in seen] == [5, 10, 15, 20]
  np.testing.assert_allclose([v for _, v in seen], sol.history["value"][4::5], rtol=1e-12)
  assert "20/20" in log.getvalue()
  fixed = upper.optimize(
    hg, 1.0, optax.sgd(5.0), steps=5, y0=jnp.zeros(2), data={"target": jnp.ones(2)}
  )
  assert int(fixed.info.status) == Status.SUCCESS


def test_optimize_data_errors_name_the_argument():
  run = lambda **kw: upper.optimize(hg, 1.0, optax.sgd(1.0), steps=3, y0=jnp.zeros(2), **kw)
  with pytest.raises(ValueError, match="`key=`"):
    run(data=lambda t, key: {"target": jnp.ones(2)})
  with pytest.raises(TypeError, match="`data`"):
    run(data=3)
  with pytest.raises(ValueError, match="`data` ran out"):
    run(data=iter([{"target": jnp.ones(2)}]))
  with pytest.raises(TypeError, match="`data\\(t, key\\)` must return a dict"):
    run(data=lambda t, key: jnp.ones(2), key=jax.random.PRNGKey(0))
  with pytest.raises(TypeError, match="hypergradient_fn"):
    run(data={"wrong_name": jnp.ones(2)})
  with pytest.raises(TypeError, match="`callback`"):
    run(data={"target": jnp.ones(2)}, callback=3)


def test_steps_of_many_tasks_shard_over_a_mesh():
  """One vmapped step over 8 tasks, the tasks split over the devices of a
  `sharding.make_mesh()` mesh: the same numbers as on one device."""
  from jax.sharding import NamedSharding, PartitionSpec

  from bilevel_jax import sharding

  mesh = sharding.make_mesh()
  tasks = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
  stepper = upper.make_step(hg, optax.sgd(0.5))
  lams = jnp.linspace(0.5, 2.0, 8)
  targets = jnp.linspace(0.5, 1.5, 8)[:, None] * jnp.ones((8, 2))
  states = jax.vmap(stepper.init)(lams, jnp.zeros((8, 2)))
  step = jax.vmap(lambda s, t: stepper.step(s, target=t))
  sharded_states, sharded_targets = jax.device_put((states, targets), tasks)
  out, _ = jax.jit(step)(sharded_states, sharded_targets)
  ref, _ = jax.jit(step)(states, targets)
  np.testing.assert_allclose(out.x, ref.x, rtol=1e-12)
  assert len(out.x.sharding.device_set) == len(mesh.devices.flat)
