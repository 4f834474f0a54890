"""Sharded batches equal single-device batches; multi-process run over loopback.

tests/conftest.py gives the process four CPU host devices.
"""

import doctest
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax._src.sharding as sharding_src
from bilevel_jax import sharding
from bilevel_jax import upper
from tests import multihost_worker as worker
from tests.helpers import tree_allclose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
  jax.device_count() < 4,
  reason="needs 4 CPU host devices: JAX started before tests/conftest.py set XLA_FLAGS",
)

BDA = jax.vmap(worker.task_hypergradient, in_axes=(None, 0, 0))


def _bda_inputs(num_tasks, dtype):
  tasks, x0 = worker.make_tasks(num_tasks)
  tasks = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tasks)
  return jnp.asarray(x0, dtype), jnp.zeros((num_tasks, x0.size), dtype), tasks


def _ridge_task(log_lam, data):
  """Closed-form lower level y*(x) = (A^T A + e^x I)^{-1} A^T b, F = |A_v y* - b_v|^2 / 2;
  the hypergradient is the derivative of the closed form (implicit-function style)."""

  def phi(log_lam):
    a = data["a"]
    gram = a.T @ a + jnp.exp(log_lam) * jnp.eye(a.shape[1], dtype=a.dtype)
    y = jnp.linalg.solve(gram, a.T @ data["b"])
    return 0.5 * jnp.sum((data["a_val"] @ y - data["b_val"]) ** 2)

  value, grad = jax.value_and_grad(phi)(log_lam)
  return value, grad


def _ridge_inputs(num_tasks, dtype):
  rng = np.random.default_rng(3)
  data = {
    "a": rng.normal(size=(num_tasks, 12, 4)),
    "b": rng.normal(size=(num_tasks, 12)),
    "a_val": rng.normal(size=(num_tasks, 6, 4)),
    "b_val": rng.normal(size=(num_tasks, 6)),
  }
  return jnp.asarray(0.3, dtype), jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), data)


def _reference(batched, args, reduce, reduced=(0, 1)):
  """Single device, no sharding: the plain vmapped function, reduced in NumPy."""
  outs = jax.jit(batched)(*args)
  op = np.mean if reduce == "mean" else np.sum
  return tuple(
    jax.tree_util.tree_map(lambda a: op(np.asarray(a), axis=0), o) if i in reduced else o
    for i, o in enumerate(outs)
  )


def _tol(dtype):
  return dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
  "num_tasks, reduce", [(8, "mean"), (7, "sum"), (3, "mean")]
)  # even, uneven (padded), fewer tasks than devices
def test_bda_sharded_equals_single_device(dtype, num_tasks, reduce):
  args = _bda_inputs(num_tasks, dtype)
  expected = _reference(BDA, args, reduce)
  for devices in (1, 2, 4):
    fn = sharding.shard_hypergradient(
      BDA, sharding.make_mesh(devices), in_axes=(None, 0, 0), reduce=reduce
    )
    value, grad, y_k = fn(*args)
    assert value.shape == () and grad.shape == args[0].shape
    assert y_k.shape == (num_tasks, 3) and value.dtype == dtype and grad.dtype == dtype
    assert tree_allclose((value, grad, y_k), expected, **_tol(dtype)), devices


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_closed_form_hypergradient_sharded(dtype):
  batched = jax.vmap(_ridge_task, in_axes=(None, 0))
  x, data = _ridge_inputs(10, dtype)
  fn = sharding.shard_hypergradient(
    batched, sharding.make_mesh(4), in_axes=(None, 0), reduce="mean"
  )
  value, grad = fn(x, data)
  loop = [_ridge_task(x, jax.tree_util.tree_map(lambda a: a[j], data)) for j in range(10)]
  np.testing.assert_allclose(value, np.mean([v for v, _ in loop]), **_tol(dtype))
  np.testing.assert_allclose(grad, np.mean([g for _, g in loop]), **_tol(dtype))
  if dtype == jnp.float64:  # the reduced gradient is the derivative of the reduced value
    eps = 1e-6
    fd = (fn(x + eps, data)[0] - fn(x - eps, data)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-7)


def test_value_function_method_shards():
  """A solve-to-tolerance method (`value.quadratic`, a lax.while_loop with a
  custom VJP) shards like the unrolled ones. Per task, v_mu(x) =
  min_y |y - a|^2 / 2 + x sum(y) + mu |y|^2 / 2, so y* = (a - x) / (1 + mu)
  and dv/dx = sum(y*)."""
  from bilevel_jax import value

  mu = 0.1

  def task(x, a):
    g = lambda x, y: 0.5 * jnp.sum((y - a) ** 2) + x * jnp.sum(y)
    return jax.value_and_grad(lambda x: value.quadratic(g, x, jnp.zeros(3), mu=mu).value)(x)

  a = jnp.asarray(np.random.default_rng(0).normal(size=(7, 3)))
  fn = sharding.shard_hypergradient(
    jax.vmap(task, in_axes=(None, 0)), sharding.make_mesh(4), in_axes=(None, 0), reduce="mean"
  )
  value_, grad = fn(jnp.asarray(0.3), a)
  y = (a - 0.3) / (1 + mu)
  v = 0.5 * jnp.sum((y - a) ** 2, 1) + 0.3 * jnp.sum(y, 1) + 0.5 * mu * jnp.sum(y**2, 1)
  np.testing.assert_allclose(value_, jnp.mean(v), rtol=1e-8)
  np.testing.assert_allclose(grad, jnp.mean(jnp.sum(y, 1)), rtol=1e-7)


def test_batched_outputs_are_sharded_and_nothing_retraces():
  args = _bda_inputs(8, jnp.float64)
  # The first call traces twice (the shape check and the program); a second
  # call with new values must not trace again.
  chex.clear_trace_counter()
  fn = sharding.shard_hypergradient(
    chex.assert_max_traces(lambda *a: BDA(*a), n=2),
    sharding.make_mesh(4),
    in_axes=(None, 0, 0),
    reduce="mean",
  )
  _, _, y_k = fn(*args)
  assert {d.id for d in y_k.sharding.device_set} == {d.id for d in jax.devices()[:4]}
  assert y_k.addressable_shards[0].data.shape == (2, 3)  # 8 tasks over 4 devices
  fn(args[0] + 1.0, args[1], args[2])  # a second trace would raise


def test_differentiates_and_vmaps_through_the_sharded_function():
  args = _bda_inputs(6, jnp.float64)
  fn = sharding.shard_hypergradient(BDA, sharding.make_mesh(4), in_axes=(None, 0, 0), reduce="sum")
  value_fn = lambda x: fn(x, args[1], args[2])[0]
  np.testing.assert_allclose(jax.grad(value_fn)(args[0]), fn(*args)[1], rtol=1e-12)
  xs = jnp.stack([args[0], 2 * args[0], -args[0]])
  grads = jax.vmap(lambda x: fn(x, args[1], args[2])[1])(xs)
  for x, g in zip(xs, grads):
    np.testing.assert_allclose(g, fn(x, args[1], args[2])[1], rtol=1e-12)


def test_sharded_hypergradient_drives_the_upper_loop():
  """`upper.optimize` with warm starts: sharded over 4 devices == one device."""
  x0, y0, tasks = _bda_inputs(6, jnp.float64)
  results = []
  for devices in (1, 4):
    fn = sharding.shard_hypergradient(
      BDA, sharding.make_mesh(devices), in_axes=(None, 0, 0), reduce="mean"
    )
    results.append(
      upper.optimize(
        lambda x, y: fn(x, y, tasks), x0, optax.adam(0.05), steps=5, y0=y0, warm_start=True
      )
    )
  np.testing.assert_allclose(results[0].x, results[1].x, rtol=1e-10)
  np.testing.assert_allclose(results[0].history["value"], results[1].history["value"], rtol=1e-10)
  np.testing.assert_allclose(results[0].y, results[1].y, rtol=1e-10)


def test_uneven_batch_rejected_without_padding():
  args = _bda_inputs(7, jnp.float64)
  fn = sharding.shard_hypergradient(
    BDA, sharding.make_mesh(4), in_axes=(None, 0, 0), reduce="mean", pad=False
  )
  with pytest.raises(ValueError, match=r"argument 1 has batch size 7, not a multiple of the 4"):
    fn(*args)
  fn(*_bda_inputs(8, jnp.float64))  # divisible batches still run


def _mesh4():
  return sharding.make_mesh(4)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(reduce="avg"), ValueError, r"`reduce` must be one of \('mean', 'sum'\), got 'avg'"),
    (dict(in_axes=(None, 1, 0)), ValueError, r"`in_axes\[1\]` must be 0 .* got 1"),
    (dict(in_axes=(None, None, None)), ValueError, r"`in_axes` has no batched argument"),
    (dict(in_axes=0), TypeError, r"`in_axes` must be a tuple"),
    (dict(reduced_outputs=(0, 0)), ValueError, r"`reduced_outputs` must hold distinct"),
    (dict(reduced_outputs=1), TypeError, r"`reduced_outputs` must be a sequence"),
    (dict(axis_name="tasks"), ValueError, r"`axis_name` 'tasks' is not an axis of the mesh"),
    (dict(mesh="cpu"), TypeError, r"`mesh` must be a jax.sharding.Mesh"),
    (dict(fn=3), TypeError, r"`fn` must be callable"),
  ],
)
def test_bad_configuration_names_the_argument(kwargs, error, match):
  call = dict(fn=BDA, mesh=_mesh4(), in_axes=(None, 0, 0), reduce="mean")
  call.update(kwargs)
  with pytest.raises(error, match=match):
    sharding.shard_hypergradient(call.pop("fn"), call.pop("mesh"), **call)


def test_bad_inputs_name_the_argument_at_trace_time():
  x0, y0, tasks = _bda_inputs(8, jnp.float64)
  fn = sharding.shard_hypergradient(BDA, _mesh4(), in_axes=(None, 0, 0), reduce="mean")
  with pytest.raises(ValueError, match=r"argument 2 has batch size 6 but argument 1 has 8"):
    fn(x0, y0, jax.tree_util.tree_map(lambda a: a[:6], tasks))
  with pytest.raises(ValueError, match=r"`in_axes` has 3 entries but the function got 2"):
    fn(x0, y0)
  with pytest.raises(ValueError, match=r"argument 1 \(in_axes\[1\] = 0\) has a scalar leaf"):
    fn(x0, jnp.float64(0.0), tasks)
  unbatched = lambda x, a: (jnp.sum(a), x)  # not vmapped: no batch axis on the outputs
  bad = sharding.shard_hypergradient(unbatched, _mesh4(), in_axes=(None, 0), reduce="sum")
  with pytest.raises(ValueError, match=r"output 0 of `fn` has a leaf of shape \(\).*vmapped"):
    bad(x0, tasks["a"])
  ints = sharding.shard_hypergradient(
    lambda x, a: (a.astype(jnp.int32),),
    _mesh4(),
    in_axes=(None, 0),
    reduce="sum",
    reduced_outputs=(0,),
  )
  with pytest.raises(TypeError, match=r"`reduced_outputs` includes output 0, .* int32"):
    ints(x0, tasks["a"])
  short = sharding.shard_hypergradient(lambda x, a: (a,), _mesh4(), in_axes=(None, 0), reduce="sum")
  with pytest.raises(ValueError, match=r"`reduced_outputs` index 1 is out of range"):
    short(x0, tasks["a"])
  single = sharding.shard_hypergradient(
    lambda x, a: a, _mesh4(), in_axes=(None, 0), reduce="sum", reduced_outputs=(0,)
  )
  with pytest.raises(TypeError, match=r"`fn` must return a tuple"):
    single(x0, tasks["a"])


def test_make_mesh_checks_and_docstring_example():
  assert sharding.make_mesh().shape == {"batch": jax.device_count()}
  assert sharding.make_mesh(2, axis_name="tasks").shape == {"tasks": 2}
  with pytest.raises(ValueError, match=r"`num_devices` must lie in \[1, "):
    sharding.make_mesh(jax.device_count() + 1)
  with pytest.raises(TypeError, match=r"`num_devices` must be an int"):
    sharding.make_mesh(2.0)
  result = doctest.testmod(sharding_src, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_over_loopback_equal_one_process(tmp_path):
  """Two processes (2 CPU devices each, gloo collectives over TCP on
  127.0.0.1), each owning half of the batch, run three upper steps; both see
  the values, x and y_K of the same computation in one process."""
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
  )
  script = os.path.join(REPO, "tests", "multihost_worker.py")
  for attempt in range(2):  # a second try only if the free port was taken meanwhile
    port = _free_port()
    outs = [tmp_path / f"process{i}_{attempt}.npz" for i in range(2)]
    procs = [
      subprocess.Popen(
        [sys.executable, script, str(i), "2", str(port), str(outs[i])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i in range(2)
    ]
    logs = []
    for proc in procs:
      try:
        logs.append(proc.communicate(timeout=120)[0])
      except subprocess.TimeoutExpired:
        for p in procs:
          p.kill()
        pytest.fail("multi-process run timed out after 120 s:\n" + "\n".join(logs))
    if all(p.returncode == 0 for p in procs):
      break
    if attempt == 1 or "address already in use" not in "".join(logs).lower():
      pytest.fail("multi-process run failed:\n" + "\n----\n".join(logs))

  # The same computation in this process, without sharding.
  x0, y0, tasks = _bda_inputs(worker.TASKS, jnp.float64)
  x, values = x0, []
  for _ in range(worker.UPPER_STEPS):
    value, grad, y_k = _reference(BDA, (x, y0, tasks), "mean")
    x = x - worker.UPPER_LR * grad
    values.append(value)
  for out in outs:
    got = np.load(out)
    assert int(got["processes"]) == 2 and int(got["global_devices"]) == 4
    assert int(got["local_devices"]) == 2
    assert tuple(got["batch_shape"]) == (worker.TASKS, 3)
    np.testing.assert_allclose(got["values"], values, rtol=1e-12)
    np.testing.assert_allclose(got["x"], x, rtol=1e-12)
    np.testing.assert_allclose(got["y_k"], y_k, rtol=1e-12)
