"""Second-order MAML (Finn, Abbeel & Levine, 2017) on the few-shot model of
`bilevel_jax._src.meta.fewshot`: the reference meta-learner beside RHG,
T-RHG and BDA in the BDA paper's Section 5.3 comparison.

MAML learns an initialization theta = (x, y) of *all* parameters (the
representation x and one head y = (W, b) shared by every task, since the
classes of an episode are labelled at random). For task j with lower
objective f_j (`fewshot.task_lower`: training cross-entropy plus
(l2 / 2) ||W||^2) it runs K gradient steps from theta,

    theta^j_0 = theta,   theta^j_{k+1} = theta^j_k - s_l grad f_j(theta^j_k),

and minimizes the query loss after adaptation,

    Phi(theta) = sum_j F_j(theta^j_K(theta)),   F_j = `fewshot.task_upper`.

The meta-gradient d F_j(theta^j_K) / d theta is computed by reverse-mode
differentiation through the K steps, Hessian-vector products included
(second-order MAML, not the first-order approximation). In the bilevel
reading, MAML is the lower problem min_theta' f_j(theta') started at the
upper variable, y_0 = theta, with all of theta adapted; RHG/BDA instead keep
x fixed in the lower problem and adapt only the head from y_0 = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bilevel_jax._src.meta import fewshot


def init_maml(x: list, ways: int) -> dict:
  """MAML's meta-parameters theta = {"x": x, "head": y} with a zero head
  y = (W: (h, ways), b: (ways,)), h the width of x's last layer.

  Examples:
    >>> import jax
    >>> from bilevel_jax import meta
    >>> theta = meta.init_maml(meta.init_representation(jax.random.PRNGKey(0), [4, 3]), ways=2)
    >>> theta["head"]["w"].shape, theta["head"]["b"].shape
    ((3, 2), (2,))
  """
  last = x[-1]["w"]
  return {
    "x": x,
    "head": {
      "w": jnp.zeros((last.shape[1], ways), last.dtype),
      "b": jnp.zeros((ways,), last.dtype),
    },
  }


def maml_adapt(theta: dict, task, *, steps: int, lower_lr: float, l2: float) -> dict:
  """theta^j_K: K gradient steps of size s_l = ``lower_lr`` on f_j from theta,
  every parameter (representation and head) adapted; differentiable in theta.

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> task = jax.tree_util.tree_map(lambda a: a[0], tasks)     # one episode
    >>> theta = meta.init_maml(meta.init_representation(jax.random.PRNGKey(0), [4, 3]), 2)
    >>> theta_k = meta.maml_adapt(theta, task, steps=5, lower_lr=0.5, l2=0.1)
    >>> bool(jnp.any(theta_k["x"][0]["w"] != theta["x"][0]["w"]))   # x adapts too
    True
  """
  lower = lambda th: fewshot.task_lower(th["x"], th["head"], task, l2)

  def step(th, _):
    g = jax.grad(lower)(th)
    return jax.tree_util.tree_map(lambda p, d: p - lower_lr * d, th, g), None

  theta_k, _ = jax.lax.scan(step, theta, None, length=steps)
  return theta_k


def maml_task_loss(theta: dict, task, *, steps: int, lower_lr: float, l2: float) -> jax.Array:
  """F_j(theta^j_K(theta)): the query loss of one task after `maml_adapt`.

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> task = jax.tree_util.tree_map(lambda a: a[0], tasks)
    >>> theta = meta.init_maml(meta.init_representation(jax.random.PRNGKey(0), [4, 3]), 2)
    >>> round(float(meta.maml_task_loss(theta, task, steps=0, lower_lr=0.5, l2=0.1)), 4)
    0.6931
  """
  theta_k = maml_adapt(theta, task, steps=steps, lower_lr=lower_lr, l2=l2)
  return fewshot.task_upper(theta_k["x"], theta_k["head"], task)


def maml_batched_hypergradient(*, steps: int, lower_lr: float, l2: float):
  """``fn(theta, tasks) -> (values (T,), grads (T, ...theta))``: each task's
  F_j(theta^j_K) and its second-order MAML meta-gradient, vmapped over the
  task axis (sum or average the gradients over tasks for the meta-step).

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> theta = meta.init_maml(meta.init_representation(jax.random.PRNGKey(0), [4, 3]), 2)
    >>> fn = jax.jit(meta.maml_batched_hypergradient(steps=5, lower_lr=0.5, l2=0.1))
    >>> values, grads = fn(theta, tasks)
    >>> values.shape, grads["x"][0]["w"].shape, grads["head"]["w"].shape
    ((3,), (3, 4, 3), (3, 3, 2))
  """

  def one(theta, task):
    return jax.value_and_grad(maml_task_loss)(theta, task, steps=steps, lower_lr=lower_lr, l2=l2)

  return jax.vmap(one, in_axes=(None, 0))


def maml_evaluate(theta: dict, tasks, *, steps: int, lower_lr: float, l2: float) -> jax.Array:
  """Query accuracy of each task (shape (T,)) after `maml_adapt` on its
  training split alone.

  Examples:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> tasks = jax.tree_util.tree_map(jnp.asarray, meta.sample_episodes(
    ...     features, labels, np.arange(6), ways=2, shots=1, queries=2, num_tasks=3,
    ...     rng=np.random.default_rng(0)))
    >>> theta = meta.init_maml(meta.init_representation(jax.random.PRNGKey(0), [4, 3]), 2)
    >>> acc = meta.maml_evaluate(theta, tasks, steps=5, lower_lr=0.5, l2=0.1)
    >>> acc.shape, bool(jnp.all((0 <= acc) & (acc <= 1)))
    ((3,), True)
  """

  def one(task):
    th = maml_adapt(theta, task, steps=steps, lower_lr=lower_lr, l2=l2)
    predicted = jnp.argmax(fewshot.logits(th["x"], th["head"], task.x_val), axis=-1)
    return jnp.mean(predicted == task.y_val)

  return jax.vmap(one)(tasks)
