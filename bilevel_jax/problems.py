"""Bilevel test problems."""

from bilevel_jax._src.problems import example1
from bilevel_jax._src.problems.hypercleaning import CleaningData
from bilevel_jax._src.problems.hypercleaning import HyperCleaning
from bilevel_jax._src.problems.hypercleaning import accuracy
from bilevel_jax._src.problems.hypercleaning import cross_entropy
from bilevel_jax._src.problems.hypercleaning import detection_f1
from bilevel_jax._src.problems.quadratic import QuadraticProblem
from bilevel_jax._src.problems.quadratic import make_quadratic

__all__ = [
  "CleaningData",
  "HyperCleaning",
  "QuadraticProblem",
  "accuracy",
  "cross_entropy",
  "detection_f1",
  "example1",
  "make_quadratic",
]
