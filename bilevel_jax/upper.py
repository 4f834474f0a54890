"""Upper-level drivers: any Optax optimizer on the hypergradient."""
from bilevel_jax._src.upper_loop import NONFINITE
from bilevel_jax._src.upper_loop import OptimizeInfo
from bilevel_jax._src.upper_loop import OptimizeResult
from bilevel_jax._src.upper_loop import SUCCESS
from bilevel_jax._src.upper_loop import optimize

__all__ = ["NONFINITE", "OptimizeInfo", "OptimizeResult", "SUCCESS", "optimize"]
