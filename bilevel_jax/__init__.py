"""bilevel_jax: differentiable bilevel optimization in JAX.

Every solver returns a ``*Solution`` whose ``info.status`` is a `Status`
code (the same integer means the same thing everywhere); ``throw=True``
raises `SolverError` instead.

Namespaces:
  bilevel_jax.composite    composite lower levels g + h(G): regularized solve, (3.6) hypergradient.
  bilevel_jax.bda          BDA / RHG / truncated RHG unrolled hypergradients.
  bilevel_jax.upper        the Optax-driven upper loop.
  bilevel_jax.schedules    aggregation schedules alpha_k.
  bilevel_jax.prox         proximal operators for nonsmooth lower levels.
  bilevel_jax.projections  projections onto the upper feasible set X.
  bilevel_jax.problems     test problems (Example 1, quadratic, hyper-cleaning).
  bilevel_jax.data         offline datasets.
  bilevel_jax.smoothing    smoothing families g_mu (plus function, Moreau envelopes).
  bilevel_jax.value        entropic / quadratic smoothed value functions, (VFP_eps) solver.
  bilevel_jax.sharding     batches of problems sharded over devices and hosts.
  bilevel_jax.meta         few-shot meta-learning: episodes, datasets, the bilevel model.
"""

from bilevel_jax._src.checkpointing import CheckpointError
from bilevel_jax._src.status import SolverError
from bilevel_jax._src.status import Status
from bilevel_jax._src.status import status_message
from bilevel_jax import bda
from bilevel_jax import composite
from bilevel_jax import data
from bilevel_jax import implicit
from bilevel_jax import meta
from bilevel_jax import problems
from bilevel_jax import projections
from bilevel_jax import prox
from bilevel_jax import schedules
from bilevel_jax import smoothing
from bilevel_jax import sharding
from bilevel_jax import upper
from bilevel_jax import value

__version__ = "0.2.0"

__all__ = [
  "CheckpointError",
  "SolverError",
  "Status",
  "status_message",
  "bda",
  "composite",
  "data",
  "implicit",
  "meta",
  "problems",
  "projections",
  "prox",
  "schedules",
  "sharding",
  "smoothing",
  "upper",
  "value",
]
