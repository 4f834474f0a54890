"""Sharding batches of bilevel problems over devices and hosts.

See `bilevel_jax._src.sharding`: `shard_hypergradient` splits a batched
(vmapped) hypergradient over a mesh axis, replicates the upper variables and
reduces their gradient across devices; `process_local_batch` and `replicate`
build the global inputs of a multi-process run started with
`jax.distributed.initialize`.
"""

from bilevel_jax._src.sharding import REDUCTIONS
from bilevel_jax._src.sharding import make_mesh
from bilevel_jax._src.sharding import process_local_batch
from bilevel_jax._src.sharding import replicate
from bilevel_jax._src.sharding import shard_hypergradient

__all__ = ["REDUCTIONS", "make_mesh", "process_local_batch", "replicate", "shard_hypergradient"]
