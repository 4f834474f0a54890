"""Upper-level drivers: any Optax optimizer on the hypergradient, and the
gradient-sampling methods of Solla & Royset (Algorithms 1 and 2)."""
from bilevel_jax._src.gradient_sampling import GSInfo
from bilevel_jax._src.gradient_sampling import GSResult
from bilevel_jax._src.gradient_sampling import gradient_sampling
from bilevel_jax._src.gradient_sampling import sqp_gradient_sampling
from bilevel_jax._src.minnorm import MinNormResult
from bilevel_jax._src.minnorm import min_norm_hull
from bilevel_jax._src.upper_loop import NONFINITE
from bilevel_jax._src.upper_loop import OptimizeInfo
from bilevel_jax._src.upper_loop import OptimizeResult
from bilevel_jax._src.upper_loop import SUCCESS
from bilevel_jax._src.upper_loop import optimize

__all__ = ["GSInfo", "GSResult", "MinNormResult", "NONFINITE", "OptimizeInfo",
           "OptimizeResult", "SUCCESS", "gradient_sampling", "min_norm_hull",
           "optimize", "sqp_gradient_sampling"]
