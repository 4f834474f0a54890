"""Bi-level Descent Aggregation (BDA), RHG and truncated RHG.

See `bilevel_jax._src.unrolled` for the update rules (Liu et al., ICML 2020,
eq. 9-10 and 12-13).
"""

from bilevel_jax._src.unrolled import BDAInfo
from bilevel_jax._src.unrolled import BDASolution
from bilevel_jax._src.unrolled import hypergradient
from bilevel_jax._src.unrolled import make_hypergradient
from bilevel_jax._src.unrolled import solve

__all__ = ["BDAInfo", "BDASolution", "hypergradient", "make_hypergradient", "solve"]
