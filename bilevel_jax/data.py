"""Offline datasets and splits (nothing is downloaded)."""

from bilevel_jax._src.datasets import DATASETS
from bilevel_jax._src.datasets import corrupt_labels
from bilevel_jax._src.datasets import hypercleaning_split
from bilevel_jax._src.datasets import load
from bilevel_jax._src.datasets import load_digits
from bilevel_jax._src.datasets import load_mnist
from bilevel_jax._src.datasets import load_mnist5k

__all__ = [
  "DATASETS",
  "corrupt_labels",
  "hypercleaning_split",
  "load",
  "load_digits",
  "load_mnist",
  "load_mnist5k",
]
