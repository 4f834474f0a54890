"""Upper-level drivers: one upper step for your own loop (`make_step`), the loop
`optimize` (history, checkpoints, data per step), and the gradient-sampling
methods of Solla & Royset (Algorithms 1 and 2)."""

from bilevel_jax._src.gradient_sampling import GradientSamplingHistory
from bilevel_jax._src.gradient_sampling import GradientSamplingInfo
from bilevel_jax._src.gradient_sampling import GradientSamplingSolution
from bilevel_jax._src.gradient_sampling import SQPGradientSamplingHistory
from bilevel_jax._src.gradient_sampling import SQPGradientSamplingInfo
from bilevel_jax._src.gradient_sampling import gradient_sampling
from bilevel_jax._src.gradient_sampling import sqp_gradient_sampling
from bilevel_jax._src.minnorm import MinNormInfo
from bilevel_jax._src.minnorm import MinNormSolution
from bilevel_jax._src.minnorm import min_norm_hull
from bilevel_jax._src.upper_loop import OptimizeInfo
from bilevel_jax._src.upper_loop import OptimizeSolution
from bilevel_jax._src.upper_loop import optimize
from bilevel_jax._src.upper_step import UpperState
from bilevel_jax._src.upper_step import UpperStep
from bilevel_jax._src.upper_step import UpperStepInfo
from bilevel_jax._src.upper_step import make_step

__all__ = [
  "GradientSamplingHistory",
  "GradientSamplingInfo",
  "GradientSamplingSolution",
  "MinNormInfo",
  "MinNormSolution",
  "OptimizeInfo",
  "OptimizeSolution",
  "SQPGradientSamplingHistory",
  "SQPGradientSamplingInfo",
  "UpperState",
  "UpperStep",
  "UpperStepInfo",
  "gradient_sampling",
  "make_step",
  "min_norm_hull",
  "optimize",
  "sqp_gradient_sampling",
]
