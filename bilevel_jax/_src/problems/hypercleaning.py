"""Data hyper-cleaning (Liu et al. 2020, Section 5.2; Franceschi et al. 2017).

Softmax regression y = (W, b); per-sample weights sigma(x_i):

    f(x, y) = (1/n_tr) sum_i sigma(x_i) CE(y; u_i, v_i)       (training set)
    F(x, y) = (1/n_val) [sum_j CE(y; u_j, v_j) + lambda ||y||^2]   (validation)

These are the paper's objectives divided by n_tr and n_val, which leaves
their minimizers unchanged and only rescales the step sizes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class CleaningData(NamedTuple):
  """Features in [0, 1] and integer labels; ``corrupted`` marks the training
  samples whose label was replaced.

  `bilevel_jax.data.hypercleaning_split` builds one from a real data set.

  Examples:
    >>> import numpy as np, jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> u = jnp.asarray(np.random.default_rng(0).random((12, 3)), jnp.float32)
    >>> clean = (u[:, 0] > 0.5).astype(jnp.int32)
    >>> noisy = clean.at[:2].set(1 - clean[:2])          # flip two training labels
    >>> data = problems.CleaningData(
    ...     x_train=u[:6], y_train=noisy[:6], x_val=u[6:9], y_val=clean[6:9],
    ...     x_test=u[9:], y_test=clean[9:], corrupted=jnp.arange(6) < 2)
    >>> data.x_train.shape, int(data.corrupted.sum())
    ((6, 3), 2)
  """

  # Arrays: NumPy from `bilevel_jax.data` (moved to the device on use), or JAX.
  x_train: Any
  y_train: Any
  x_val: Any
  y_val: Any
  x_test: Any
  y_test: Any
  corrupted: Any


def logits(params, features):
  """Scores ``features @ W^T + b`` of the linear model ``params``.

  W is stored (classes, features), torch.nn.Linear's layout: the gradient in
  W is then ``G^T X`` (classes x features), which XLA's CPU backend computes
  about 4x faster than ``X^T G`` for the (features, classes) layout (1.84 vs
  0.46 ms at 2000 x 784 x 10), and hyper-cleaning hypergradients about 2x
  faster end to end.
  """
  return features @ params["W"].T + params["b"][None, :]


def cross_entropy(params, features, labels):
  """Per-sample softmax cross-entropy of the linear model ``params``.

  ``params`` is ``{"W": (classes, features), "b": (classes,)}``; returns one
  loss per row of ``features``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> params = {"W": jnp.eye(2), "b": jnp.zeros(2)}
    >>> features = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    >>> losses = problems.cross_entropy(params, features, jnp.array([0, 1, 0]))
    >>> [round(float(v), 4) for v in losses]
    [0.1269, 0.3133, 2.1269]
  """
  logits_ = logits(params, features)
  logz = jax.nn.logsumexp(logits_, axis=-1)
  return logz - jnp.take_along_axis(logits_, labels[:, None], axis=-1)[:, 0]


class HyperCleaning(NamedTuple):
  """The bilevel objectives over ``data`` (a pytree, so it can be vmapped).

  ``lower(x, params)`` is f (the sigmoid(x)-weighted training loss) and
  ``upper(x, params)`` is F (the validation loss plus ``l2`` ||params||^2),
  both divided by their sample counts; ``init_weights()`` gives x = 0
  (every weight sigmoid(0) = 1/2), ``init_params()`` a zero linear model,
  and ``lower_smoothness()`` a bound on L_f for the lower step size.

  Examples:
    >>> import numpy as np, jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> u = jnp.asarray(np.random.default_rng(0).random((12, 3)), jnp.float32)
    >>> labels = (u[:, 0] > 0.5).astype(jnp.int32)
    >>> data = problems.CleaningData(u[:6], labels[:6], u[6:9], labels[6:9], u[9:],
    ...                              labels[9:], jnp.zeros(6, bool))
    >>> hc = problems.HyperCleaning(data, l2=1e-3)
    >>> x, params = hc.init_weights(), hc.init_params()
    >>> x.shape, params["W"].shape, hc.num_classes
    ((6,), (2, 3), 2)
    >>> round(float(hc.lower(x, params)), 4), round(float(hc.upper(x, params)), 4)
    (0.3466, 0.6931)
  """

  data: CleaningData
  l2: float = 1e-4

  @property
  def num_classes(self) -> int:
    return int(max(np.max(self.data.y_train), np.max(self.data.y_val)) + 1)

  def init_params(self, num_classes: int | None = None, dtype=None):
    d = self.data.x_train.shape[-1]
    c = num_classes or self.num_classes
    dtype = dtype or self.data.x_train.dtype
    return {"W": jnp.zeros((c, d), dtype), "b": jnp.zeros((c,), dtype)}

  def init_weights(self, dtype=None):
    dtype = dtype or self.data.x_train.dtype
    return jnp.zeros(self.data.y_train.shape, dtype)

  def lower(self, x, params):
    losses = cross_entropy(params, self.data.x_train, self.data.y_train)
    return jnp.mean(jax.nn.sigmoid(x) * losses)

  def upper(self, x, params):
    del x
    sq = sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))
    losses = cross_entropy(params, self.data.x_val, self.data.y_val)
    return (jnp.sum(losses) + self.l2 * sq) / losses.shape[0]

  def lower_smoothness(self) -> float:
    """Upper bound on L_f: softmax CE has Hessian <= (1/2) `[u;1][u;1]^T` per
    sample, so L_f <= lambda_max(U^T U) / (2 n) with U = [features, 1]."""
    u = np.asarray(self.data.x_train, dtype=np.float64)
    u = np.concatenate([u, np.ones((u.shape[0], 1))], axis=1)
    gram = u @ u.T if u.shape[0] < u.shape[1] else u.T @ u  # same nonzero spectrum
    return float(np.linalg.eigvalsh(gram / u.shape[0])[-1] / 2)


def accuracy(params, features, labels):
  """Fraction of rows of ``features`` whose arg-max logit is their label.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> params = {"W": jnp.eye(2), "b": jnp.zeros(2)}
    >>> features = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    >>> round(float(problems.accuracy(params, features, jnp.array([0, 1, 0]))), 4)
    0.6667
  """
  return jnp.mean(jnp.argmax(logits(params, features), axis=-1) == labels)


def detection_f1(x, corrupted):
  """F1 score of flagging sample i as corrupted when sigma(x_i) < 1/2.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bilevel_jax import problems
    >>> x = jnp.array([-1.0, 2.0, -0.5, 1.0])            # samples 0 and 2 flagged
    >>> corrupted = jnp.array([True, False, False, True])
    >>> float(problems.detection_f1(x, corrupted))         # precision 1/2, recall 1/2
    0.5
  """
  flagged = x < 0
  tp = jnp.sum(flagged & corrupted)
  precision = tp / jnp.maximum(jnp.sum(flagged), 1)
  recall = tp / jnp.maximum(jnp.sum(corrupted), 1)
  return jnp.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
