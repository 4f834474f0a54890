"""Few-shot meta-learning as a bilevel problem (BDA paper, Section 5.3).

A shared representation h(x; u) (a small tanh network with parameters x)
feeds one multinomial logistic head y^j = (W^j, b^j) per task j. With
l(x, y^j; D) the mean cross-entropy of softmax(W^j^T h(x; u) + b^j) on D,

    lower:  f(x, {y^j}) = sum_j [ l(x, y^j; D_tr^j) + (l2 / 2) ||W^j||^2 ],
    upper:  F(x, {y^j}) = sum_j l(x, y^j; D_val^j).

Both objectives are sums of per-task terms and y^j enters only term j, so
every lower iteration of BDA (eq. 10), with grad_{y^j} F = grad_{y^j} F_j,
updates each head from its own task alone: K joint iterations on {y^j} are
exactly K iterations per task run side by side, and

    d phi_K / dx = sum_j d F_j(x, y^j_K(x)) / dx.

This module therefore writes one task's hypergradient and vmaps it over
tasks; `bilevel_jax.sharding.shard_hypergradient` then splits the tasks over
devices (``reduce='sum'`` is the paper's F, ``'mean'`` the same direction
divided by the number of tasks).

At test time a new task only has its training split: its head is fitted by
K steps of gradient descent on the lower objective from y0 = 0 (alpha = 0,
since the validation labels are what is being predicted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bilevel_jax._src import unrolled


def init_representation(key: jax.Array, sizes: Sequence[int], dtype=jnp.float32) -> list:
  """Parameters x of a tanh network with layer widths ``sizes`` (input first).

  Weights are N(0, 1 / fan_in), biases zero; returns a list of
  ``{"w": (fan_in, fan_out), "b": (fan_out,)}``.

  Examples:
    >>> import jax
    >>> from bilevel_jax import meta
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 8, 3])
    >>> [(layer["w"].shape, layer["b"].shape) for layer in x]
    [((4, 8), (8,)), ((8, 3), (3,))]
  """
  sizes = [int(s) for s in sizes]
  if len(sizes) < 2 or any(s <= 0 for s in sizes):
    raise ValueError(f"`sizes` must list at least two positive widths, got {sizes}.")
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {"w": jax.random.normal(k, (a, b), dtype) / math.sqrt(a), "b": jnp.zeros((b,), dtype)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:])
  ]


def represent(x: list, inputs: jax.Array) -> jax.Array:
  """h(x; u): the meta features of ``inputs`` (..., d), each entry in [-1, 1].

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> h = meta.represent(x, jnp.ones((2, 5, 4)))   # any leading axes
    >>> h.shape, bool(jnp.all(jnp.abs(h) <= 1))
    ((2, 5, 3), True)
  """
  h = inputs
  for layer in x:
    h = jnp.tanh(_affine(h, layer["w"], layer["b"]))
  return h


def _affine(h: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """h W + b with b broadcast explicitly over the leading axes of h."""
  z = h @ w
  return z + jnp.reshape(b, (1,) * (z.ndim - 1) + b.shape)


def init_heads(num_tasks: int, feature_dim: int, ways: int, dtype=jnp.float32) -> dict:
  """y0 = 0 for ``num_tasks`` heads: {"w": (T, feature_dim, ways), "b": (T, ways)}.

  Examples:
    >>> from bilevel_jax import meta
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=8, ways=5)
    >>> heads["w"].shape, heads["b"].shape
    ((3, 8, 5), (3, 5))
  """
  return {
    "w": jnp.zeros((num_tasks, feature_dim, ways), dtype),
    "b": jnp.zeros((num_tasks, ways), dtype),
  }


def logits(x: list, head: dict, inputs: jax.Array) -> jax.Array:
  return _affine(represent(x, inputs), head["w"], head["b"])


def cross_entropy(x: list, head: dict, inputs: jax.Array, labels: jax.Array) -> jax.Array:
  """l(x, y; D): mean softmax cross-entropy of one head on (inputs, labels).

  Examples:
    A zero head predicts uniformly: the loss is ln 2 for two ways:


    >>> import jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> head = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> loss = meta.cross_entropy(x, head, jnp.ones((5, 4)), jnp.array([0, 1, 0, 1, 1]))
    >>> round(float(loss), 4)
    0.6931
  """
  return _feature_loss(represent(x, inputs), head, labels)


def task_lower(x: list, head: dict, task, l2: float) -> jax.Array:
  """f_j = l(x, y^j; D_tr^j) + (l2 / 2) ||W^j||^2 for one task (an `Episodes` row).

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> task = jax.tree_util.tree_map(lambda a: a[0], tasks)     # one episode
    >>> head = jax.tree_util.tree_map(lambda a: a[0], heads)
    >>> round(float(meta.task_lower(x, head, task, l2=0.1)), 4)   # ln 2 at y = 0
    0.6931
  """
  return _feature_lower(represent(x, task.x_train), head, task.y_train, l2)


def task_upper(x: list, head: dict, task) -> jax.Array:
  """F_j = l(x, y^j; D_val^j).

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> task = jax.tree_util.tree_map(lambda a: a[0], tasks)     # one episode
    >>> head = jax.tree_util.tree_map(lambda a: a[0], heads)
    >>> round(float(meta.task_upper(x, head, task)), 4)            # ln 2 at y = 0
    0.6931
  """
  return cross_entropy(x, head, task.x_val, task.y_val)


def lower_smoothness(feature_dim: int, l2: float) -> float:
  """A bound on the Lipschitz constant of grad_y f_j: features lie in [-1, 1]^h,
  so the softmax cross-entropy's Hessian is at most (h + 1) / 2, plus l2.

  Examples:
    A safe lower step size is its inverse:


    >>> from bilevel_jax import meta
    >>> meta.lower_smoothness(feature_dim=3, l2=0.1)
    2.1
  """
  return 0.5 * (feature_dim + 1) + l2


def task_hypergradient(
  x: list, y0: dict, task, *, l2: float, return_info: bool = False, **solve_kwargs
):
  """(F_j(x, y^j_K), d F_j(x, y^j_K(x)) / dx, y^j_K) for one task.

  ``solve_kwargs`` are those of `bilevel_jax.bda.solve` (steps, upper_lr,
  lower_lr, alpha, truncate, ...): alpha = 0 is RHG, truncate = M truncated
  RHG. With ``return_info=True`` the third output is the lower solve's
  `bilevel_jax.bda.BDASolution` instead of y^j_K: ``solution.y`` is y^j_K and
  ``solution.info.status`` says whether the task's inner solve failed
  (DIVERGED, NONFINITE); `bilevel_jax.upper.make_step` reads it from there.

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> task = jax.tree_util.tree_map(lambda a: a[0], tasks)     # one episode
    >>> head = jax.tree_util.tree_map(lambda a: a[0], heads)
    >>> hypergradient = jax.jit(lambda x, head, task: meta.task_hypergradient(
    ...     x, head, task, l2=0.1, steps=5, upper_lr=0.5, lower_lr=0.5, alpha=0.5))
    >>> value, grad, y_k = hypergradient(x, head, task)
    >>> grad[0]["w"].shape, y_k["w"].shape        # grad is shaped like x
    ((4, 3), (3, 2))
  """
  # f_j and F_j depend on x only through the features h = (h(x; D_tr),
  # h(x; D_val)), so the K unrolled steps run on h (computed once, not in
  # every lower step and its adjoint) and d phi / dx = (dh/dx)^T d phi / dh:
  # the same hypergradient by the chain rule, at the cost of one network
  # pass per task instead of one per lower step.
  features, pullback = jax.vjp(lambda x: (represent(x, task.x_train), represent(x, task.x_val)), x)
  value, grad_h, solution = unrolled.hypergradient(
    lambda h, y: _feature_loss(h[1], y, task.y_val),
    lambda h, y: _feature_lower(h[0], y, task.y_train, l2),
    features,
    y0,
    return_info=True,
    **solve_kwargs,
  )
  (grad,) = pullback(grad_h)
  return value, grad, (solution if return_info else solution.y)


def _feature_loss(features: jax.Array, head: dict, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of a head on precomputed features."""
  z = _affine(features, head["w"], head["b"])
  picked = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(z, axis=-1) - picked)


def _feature_lower(features: jax.Array, head: dict, labels: jax.Array, l2: float) -> jax.Array:
  """f_j on precomputed features: cross-entropy plus (l2 / 2) ||W||^2."""
  return _feature_loss(features, head, labels) + 0.5 * l2 * jnp.sum(head["w"] ** 2)


def batched_hypergradient(*, l2: float, return_info: bool = False, **solve_kwargs):
  """``fn(x, y0, tasks) -> (values (T,), grads (T, ...x), y_K (T, ...))``,
  `task_hypergradient` vmapped over the task axis of ``y0`` and ``tasks``;
  give it to `bilevel_jax.sharding.shard_hypergradient` with
  ``in_axes=(None, 0, 0)``. With ``return_info=True`` the third output is the
  batched `bilevel_jax.bda.BDASolution` (``solution.info.status`` of shape
  (T,), one status per task).

  Examples:
    Three RHG tasks; the meta-gradient is the sum over tasks:


    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> fn = jax.jit(meta.batched_hypergradient(l2=0.1, steps=5, upper_lr=0.5,
    ...                                         lower_lr=0.5, alpha=0.0))
    >>> values, grads, y_k = fn(x, heads, tasks)
    >>> values.shape, grads[0]["w"].shape, y_k["w"].shape
    ((3,), (3, 4, 3), (3, 3, 2))
    >>> meta_grad = jax.tree_util.tree_map(lambda g: g.sum(0), grads)
  """

  def one(x, y0, task):
    return task_hypergradient(x, y0, task, l2=l2, return_info=return_info, **solve_kwargs)

  return jax.vmap(one, in_axes=(None, 0, 0))


def adapt(x: list, tasks, y0: dict, *, steps: int, lower_lr: float, l2: float) -> dict:
  """Fits each task's head on its training split: K gradient steps on f_j.

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> fitted = jax.jit(lambda x, tasks, heads: meta.adapt(
    ...     x, tasks, heads, steps=5, lower_lr=0.5, l2=0.1))(x, tasks, heads)
    >>> fitted["w"].shape, bool(jnp.any(fitted["w"] != 0))
    ((3, 3, 2), True)
  """

  def one(y0, task):  # the features are computed once, outside the K steps
    lower = lambda h, y: _feature_lower(h, y, task.y_train, l2)
    h = represent(x, task.x_train)
    return unrolled.solve(
      lower, lower, h, y0, steps=steps, upper_lr=1.0, lower_lr=lower_lr, alpha=0.0
    ).y

  return jax.vmap(one)(y0, tasks)


def accuracy(x: list, heads: dict, inputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-task accuracy of the heads (T, ...) on inputs (T, n, d), labels (T, n).

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> acc = meta.accuracy(x, heads, tasks.x_val, tasks.y_val)
    >>> acc.tolist()      # zero heads always predict class 0: half of each query set
    [0.5, 0.5, 0.5]
  """
  predicted = jnp.argmax(jax.vmap(lambda h, u: logits(x, h, u))(heads, inputs), axis=-1)
  return jnp.mean(predicted == labels, axis=-1)


def evaluate(x: list, tasks, y0: dict, *, steps: int, lower_lr: float, l2: float) -> jax.Array:
  """Query-set accuracy of each test task after `adapt` (shape (T,)).

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> x = meta.init_representation(jax.random.PRNGKey(0), [4, 3])
    >>> heads = meta.init_heads(num_tasks=3, feature_dim=3, ways=2)
    >>> acc = jax.jit(lambda x, tasks, heads: meta.evaluate(
    ...     x, tasks, heads, steps=5, lower_lr=0.5, l2=0.1))(x, tasks, heads)
    >>> acc.shape, bool(jnp.all((0 <= acc) & (acc <= 1)))
    ((3,), True)
  """
  heads = adapt(x, tasks, y0, steps=steps, lower_lr=lower_lr, l2=l2)
  return accuracy(x, heads, tasks.x_val, tasks.y_val)
