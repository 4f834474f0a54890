"""Euclidean projections onto simple sets (for x in X)."""

from bilevel_jax._src.projections import Projection
from bilevel_jax._src.projections import box
from bilevel_jax._src.projections import l2_ball
from bilevel_jax._src.projections import nonnegative

__all__ = ["Projection", "box", "l2_ball", "nonnegative"]
