"""One process of the two-process test in test_sharding.py (and the problem
both share).

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns a contiguous slice of a batch of BDA problems, builds the
global batch with `sharding.process_local_batch`, runs a few upper steps of
SGD on the sharded hypergradient and saves what it sees.
"""

import os
import sys

import numpy as np

TASKS = 8
UPPER_STEPS = 3
UPPER_LR = 0.5
BDA_KW = dict(steps=12, upper_lr=0.5, lower_lr=0.4, alpha=0.3)


def make_tasks(num_tasks, dim=3, seed=0):
  """Per-task data (a_j, c_j) of a family of BDA problems, and x0."""
  rng = np.random.default_rng(seed)
  return {
    "a": rng.normal(size=(num_tasks, dim)),
    "c": rng.normal(size=(num_tasks, dim)),
  }, rng.normal(size=dim)


def task_hypergradient(x, y0, task):
  """One task: f = |y - x - a|^2 / 2 + |y|^2 / 4 (lower), F = |y - c|^2 / 2 + |x|^2 / 20."""
  import jax.numpy as jnp
  from bilevel_jax import bda

  lower = lambda x, y: 0.5 * jnp.sum((y - x - task["a"]) ** 2) + 0.25 * jnp.sum(y**2)
  upper = lambda x, y: 0.5 * jnp.sum((y - task["c"]) ** 2) + 0.05 * jnp.sum(x**2)
  value, grad, sol = bda.hypergradient(upper, lower, x, y0, return_info=True, **BDA_KW)
  return value, grad, sol.y


def main(argv):
  process_id, num_processes, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
  import jax

  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  from jax.experimental import multihost_utils

  from bilevel_jax import sharding

  mesh = sharding.make_mesh()  # every device of every process
  tasks, x0 = make_tasks(TASKS)
  per_process = TASKS // num_processes
  mine = slice(process_id * per_process, (process_id + 1) * per_process)
  local_tasks = {k: v[mine] for k, v in tasks.items()}
  local_y0 = np.zeros((per_process, x0.size))
  batched = jax.vmap(task_hypergradient, in_axes=(None, 0, 0))
  fn = sharding.shard_hypergradient(batched, mesh, in_axes=(None, 0, 0), reduce="mean")
  task_batch = sharding.process_local_batch(local_tasks, mesh)
  y0 = sharding.process_local_batch(local_y0, mesh)
  x = sharding.replicate(x0, mesh)
  values = []
  for _ in range(UPPER_STEPS):
    value, grad, y_k = fn(x, y0, task_batch)
    x = x - UPPER_LR * grad
    values.append(np.asarray(value.addressable_data(0)))
  gathered = multihost_utils.process_allgather(y_k, tiled=True)
  np.savez(
    out,
    values=np.asarray(values),
    x=np.asarray(x.addressable_data(0)),
    y_k=np.asarray(gathered),
    global_devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    processes=jax.process_count(),
    batch_shape=np.asarray(task_batch["a"].shape),
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1:])
