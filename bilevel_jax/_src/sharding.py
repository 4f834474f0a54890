"""Batches of bilevel problems sharded over a device mesh (within a process
and across hosts), with JAX's own machinery: `jax.sharding.Mesh`,
`jax.shard_map` and `jax.distributed`.

A *batched hypergradient* is any function whose outputs carry a leading
batch axis of B tasks or instances, for example

    batched = jax.vmap(bda.make_hypergradient(F, f, jit=False, ...),
                       in_axes=(None, 0))        # (x, y0[B]) -> (v[B], g[B], solution[B])

`shard_hypergradient` runs it with the batch split over the D devices of a
mesh axis and the upper variable x replicated. Each device evaluates its
B / D tasks, reduces the chosen outputs over them, and one all-reduce
(`lax.psum`) combines the devices:

    sum:   G = sum_{j=1}^{B} g_j,        mean:  G = (1 / B) sum_{j=1}^{B} g_j,

where g_j = d phi_j / dx is task j's hypergradient. For the few-shot problem
of BDA Section 5.3 (F = sum_j l(x, y^j; D_val^j)), ``reduce='sum'`` is the
gradient of the paper's upper objective and ``'mean'`` is the same direction
scaled by 1 / B. Nothing depends on how the batched function computes its
outputs: BDA, RHG, implicit, closed-form or value-function hypergradients shard the same
way as long as they are vmappable.

Uneven batches (B not a multiple of D) are padded by repeating the last task
and the padded copies are masked out of every reduction; the batched outputs
are cut back to B. ``pad=False`` rejects them instead.

Several hosts (or processes): start every process with the same program and

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only
    jax.distributed.initialize(coordinator_address="10.0.0.1:1234",
                               num_processes=P, process_id=p)
    mesh = make_mesh()                       # all devices of all processes
    tasks = process_local_batch(my_tasks, mesh)  # this process's B / P tasks
    x = replicate(x0, mesh)                  # the same x0 in every process
    value, grad, y_k = shard_hypergradient(batched, mesh, in_axes=(None, 0, 0),
                                           reduce="mean")(x, y0, tasks)

The reduced outputs are replicated on every device (read them with
``value.addressable_data(0)``); ``jax.experimental.multihost_utils.
process_allgather`` collects the batched ones. tests/multihost_worker.py is a
complete example, run by the test suite as two processes over loopback. On
GPU clusters with a scheduler (SLURM, Open MPI, Kubernetes),
`jax.distributed.initialize()` without arguments finds these values itself.
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

if hasattr(jax, "shard_map"):  # JAX >= 0.6
  _shard_map: Any = jax.shard_map
  _UNCHECKED = {"check_vma": False}
else:  # pragma: no cover - older JAX
  from jax.experimental.shard_map import shard_map as _shard_map

  _UNCHECKED = {"check_rep": False}

REDUCTIONS = ("mean", "sum")
DEFAULT_AXIS = "batch"


def make_mesh(
  num_devices: int | None = None,
  *,
  axis_name: str = DEFAULT_AXIS,
  devices: Sequence[Any] | None = None,
) -> Mesh:
  """A one-dimensional mesh over ``num_devices`` devices (default: all).

  After `jax.distributed.initialize`, `jax.devices()` lists the devices of
  every process, so the default mesh spans all hosts.

  Args:
    num_devices: how many of ``devices`` to use (the first ones).
    axis_name: the mesh axis along which batches are split.
    devices: the devices to choose from (default `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` with the single axis ``axis_name``.

  Examples:
    >>> from bilevel_jax import sharding
    >>> mesh = sharding.make_mesh(1)
    >>> mesh.axis_names, mesh.shape["batch"]
    (('batch',), 1)
  """
  devices = list(jax.devices() if devices is None else devices)
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError(f"`axis_name` must be a non-empty str, got {axis_name!r}.")
  if num_devices is None:
    num_devices = len(devices)
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
    raise TypeError(f"`num_devices` must be an int, got {num_devices!r}.")
  if not 1 <= num_devices <= len(devices):
    raise ValueError(
      f"`num_devices` must lie in [1, {len(devices)}] (the devices available), got {num_devices}."
    )
  return Mesh(np.asarray(devices[:num_devices], dtype=object), (axis_name,))


def _resolve_axis(mesh: Mesh, axis_name: str | None) -> str:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  if axis_name is None:
    if len(mesh.axis_names) != 1:
      raise ValueError(f"`axis_name` is required for a mesh with axes {mesh.axis_names}.")
    return mesh.axis_names[0]
  if axis_name not in mesh.axis_names:
    raise ValueError(f"`axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
  return axis_name


def _check_in_axes(in_axes) -> tuple:
  if not isinstance(in_axes, (tuple, list)):
    raise TypeError(
      f"`in_axes` must be a tuple with one entry (0 or None) per "
      f"positional argument, got {in_axes!r}."
    )
  in_axes = tuple(in_axes)
  for i, axis in enumerate(in_axes):
    if axis is not None and (isinstance(axis, bool) or axis != 0):
      raise ValueError(
        f"`in_axes[{i}]` must be 0 (batched along the leading axis) "
        f"or None (replicated), got {axis!r}."
      )
  if all(axis is None for axis in in_axes):
    raise ValueError("`in_axes` has no batched argument (no entry is 0).")
  return in_axes


def _batch_size(args, in_axes) -> int:
  """The common leading size B of the batched arguments."""
  size, first = None, None
  for i, (arg, axis) in enumerate(zip(args, in_axes)):
    if axis is None:
      continue
    leaves = jax.tree_util.tree_leaves(arg)
    if not leaves:
      raise ValueError(f"argument {i} (in_axes[{i}] = 0) has no array leaves.")
    for leaf in leaves:
      shape = jnp.shape(leaf)
      if not shape:
        raise ValueError(
          f"argument {i} (in_axes[{i}] = 0) has a scalar leaf; "
          "batched leaves need a leading batch axis."
        )
      if size is None:
        size, first = shape[0], i
      elif shape[0] != size:
        raise ValueError(
          f"argument {i} has batch size {shape[0]} but argument "
          f"{first} has {size}: batched leaves must share their "
          "leading dimension."
        )
  if not size:
    raise ValueError(f"argument {first} has an empty batch (size 0).")
  return size


def _pad(tree, extra: int):
  """Appends ``extra`` copies of the last entry along the leading axis."""
  return jax.tree_util.tree_map(
    lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)]), tree
  )


def _count_outputs(fn, local_args, reduced) -> int:
  outputs = jax.eval_shape(fn, *local_args)
  if not isinstance(outputs, tuple):
    raise TypeError(f"`fn` must return a tuple of outputs, got {type(outputs).__name__}.")
  bad = [i for i in reduced if i >= len(outputs)]
  if bad:
    raise ValueError(
      f"`reduced_outputs` index {bad[0]} is out of range for the {len(outputs)} outputs of `fn`."
    )
  return len(outputs)


def shard_hypergradient(
  fn: Callable,
  mesh: Mesh,
  *,
  in_axes: Sequence[int | None],
  reduce: str,
  reduced_outputs: Sequence[int] = (0, 1),
  axis_name: str | None = None,
  pad: bool = True,
  jit: bool = True,
) -> Callable:
  """Runs a batched hypergradient with its batch split over a mesh axis.

  Args:
    fn: the batched function ``fn(*args) -> tuple of outputs``; every output
      leaf has a leading axis of the batch size (e.g. ``jax.vmap`` of
      `bda.make_hypergradient(..., jit=False)` with ``in_axes=(None, 0)``).
    mesh: a `jax.sharding.Mesh` (see `make_mesh`).
    in_axes: one entry per positional argument of ``fn``: ``0`` for an
      argument batched along its leading axis (split over devices), ``None``
      for one replicated on every device (the upper variable x).
    reduce: ``'mean'`` or ``'sum'`` over the B tasks, for the outputs listed
      in ``reduced_outputs``. No default: the two differ by a factor of B,
      which matters to plain SGD.
    reduced_outputs: indices of the outputs reduced over the batch (by
      default the value and the hypergradient); the others stay batched and
      come back with shape (B, ...), split over the mesh axis when B is a
      multiple of its size.
    axis_name: the mesh axis to split along (default: the mesh's only axis).
    pad: pad a batch whose size is not a multiple of the axis size by
      repeating its last task, and mask the copies out of the reductions;
      with ``False`` such a batch raises ``ValueError``.
    jit: return the function wrapped in `jax.jit` (it is traced once per
      input shape; argument checks run at trace time).

  Returns:
    ``sharded(*args) -> tuple`` with the same outputs as ``fn``, reduced ones
    replacing their batch axis by the mean or sum over it.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import sharding
    >>> def task(x, a):     # phi_j(x) = (x - a_j)^2 / 2 and its gradient
    ...   return 0.5 * (x - a) ** 2, x - a
    >>> batched = jax.vmap(task, in_axes=(None, 0))
    >>> fn = sharding.shard_hypergradient(batched, sharding.make_mesh(1),
    ...                                   in_axes=(None, 0), reduce="mean")
    >>> value, grad = fn(1.0, jnp.array([0.0, 1.0, 2.0]))
    >>> round(float(value), 4), float(grad)
    (0.3333, 0.0)
  """
  if not callable(fn):
    raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
  axis = _resolve_axis(mesh, axis_name)
  in_axes = _check_in_axes(in_axes)
  if reduce not in REDUCTIONS:
    raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}.")
  if isinstance(reduced_outputs, int) or not all(
    isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in reduced_outputs
  ):
    raise TypeError(
      f"`reduced_outputs` must be a sequence of output indices, got {reduced_outputs!r}."
    )
  reduced = tuple(int(i) for i in reduced_outputs)
  if len(set(reduced)) != len(reduced) or any(i < 0 for i in reduced):
    raise ValueError(
      f"`reduced_outputs` must hold distinct non-negative indices, got {reduced_outputs!r}."
    )
  num_shards = mesh.shape[axis]

  def sharded(*args):
    if len(args) != len(in_axes):
      raise ValueError(
        f"`in_axes` has {len(in_axes)} entries but the function got "
        f"{len(args)} positional arguments."
      )
    size = _batch_size(args, in_axes)
    padded = math.ceil(size / num_shards) * num_shards
    if padded != size and not pad:
      first = next(i for i, a in enumerate(in_axes) if a == 0)
      raise ValueError(
        f"argument {first} has batch size {size}, not a multiple of the "
        f"{num_shards} devices of mesh axis {axis!r}; pass pad=True or "
        "a batch size divisible by the axis size."
      )
    if padded != size:
      args = tuple(_pad(a, padded - size) if ax == 0 else a for a, ax in zip(args, in_axes))
    local = padded // num_shards

    def per_device(*local_args):
      outputs = fn(*local_args)
      start = lax.axis_index(axis) * local
      valid = start + jnp.arange(local) < size
      result = []
      for i, out in enumerate(outputs):
        for leaf in jax.tree_util.tree_leaves(out):
          if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != local:
            raise ValueError(
              f"output {i} of `fn` has a leaf of shape {jnp.shape(leaf)}; every "
              f"output needs a leading batch axis ({local} tasks per device here). "
              "Is `fn` vmapped?"
            )
        if i not in reduced:
          result.append(out)
          continue

        def reduce_leaf(leaf, i=i):
          if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
              f"`reduced_outputs` includes output {i}, which has a "
              f"leaf of dtype {leaf.dtype}; only float outputs reduce."
            )
          mask = valid.reshape((local,) + (1,) * (leaf.ndim - 1))
          total = lax.psum(jnp.sum(jnp.where(mask, leaf, 0), axis=0), axis)
          return total / size if reduce == "mean" else total

        result.append(jax.tree_util.tree_map(reduce_leaf, out))
      return tuple(result)

    # Output specs depend on how many outputs `fn` has: find out abstractly.
    local_args = tuple(
      jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((local,) + jnp.shape(a)[1:], jnp.result_type(a)), a
      )
      if ax == 0
      else a
      for a, ax in zip(args, in_axes)
    )
    num_outputs = _count_outputs(fn, local_args, reduced)
    out_specs = tuple(P() if i in reduced else P(axis) for i in range(num_outputs))
    in_specs = tuple(P(axis) if ax == 0 else P() for ax in in_axes)
    # Unchecked (check_vma=False): `fn` is arbitrary user code (a lax.scan whose carry
    # starts as a constant, for one) that need not annotate which values vary
    # across devices. The reduced outputs are replicated by the psum above.
    outputs = _shard_map(
      per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_UNCHECKED
    )(*args)
    if padded != size:
      outputs = tuple(
        out if i in reduced else jax.tree_util.tree_map(lambda a: a[:size], out)
        for i, out in enumerate(outputs)
      )
    return outputs

  return jax.jit(sharded) if jit else sharded


def process_local_batch(tree, mesh: Mesh, *, axis_name: str | None = None):
  """Builds global batched arrays from the part of the batch this process owns.

  In a multi-process run (after `jax.distributed.initialize`), each process
  passes its own slice of the tasks, in process order; the result is a
  pytree of global `jax.Array`s of batch size ``sum over processes of the
  local sizes``, split over ``axis_name``, which `shard_hypergradient` takes
  as a batched argument. Every process must hold the same number of tasks,
  a multiple of its number of devices on the mesh. In a single process this
  is `jax.device_put` with the batch sharding.

  Args:
    tree: pytree of host arrays with a leading batch axis (this process's tasks).
    mesh: the global mesh.
    axis_name: the mesh axis to split along (default: the mesh's only axis).

  Examples:
    One process: the whole batch is local:


    >>> import numpy as np
    >>> from bilevel_jax import sharding
    >>> mesh = sharding.make_mesh(1)
    >>> tasks = sharding.process_local_batch({"a": np.arange(4.0)}, mesh)
    >>> tasks["a"].shape, tuple(tasks["a"].sharding.spec)
    ((4,), ('batch',))
  """
  axis = _resolve_axis(mesh, axis_name)
  sharding = NamedSharding(mesh, P(axis))
  return jax.tree_util.tree_map(
    lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree
  )


def replicate(tree, mesh: Mesh):
  """Places ``tree`` on every device of ``mesh`` (the upper variables).

  In a multi-process run every process must pass the same values.

  Examples:
    >>> import numpy as np
    >>> from bilevel_jax import sharding
    >>> x = sharding.replicate({"w": np.ones(3)}, sharding.make_mesh(1))
    >>> x["w"].shape, x["w"].sharding.is_fully_replicated
    ((3,), True)
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
    lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree
  )
