"""Proximal operators ``prox(x, y, step)`` for nonsmooth lower levels."""

from bilevel_jax._src.prox import Prox
from bilevel_jax._src.prox import box
from bilevel_jax._src.prox import from_projection
from bilevel_jax._src.prox import l1
from bilevel_jax._src.prox import l2_ball
from bilevel_jax._src.prox import nonnegative

__all__ = ["Prox", "box", "from_projection", "l1", "l2_ball", "nonnegative"]
