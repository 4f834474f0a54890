"""Aggregation schedules k -> alpha_k for BDA."""

from bilevel_jax._src.schedules import Schedule
from bilevel_jax._src.schedules import constant
from bilevel_jax._src.schedules import geometric
from bilevel_jax._src.schedules import harmonic
from bilevel_jax._src.schedules import theorem2
from bilevel_jax._src.schedules import theorem2_beta

__all__ = ["Schedule", "constant", "geometric", "harmonic", "theorem2", "theorem2_beta"]
