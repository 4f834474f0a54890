"""Few-shot meta-learning (BDA paper, Section 5.3).

See `bilevel_jax._src.meta.fewshot` for the bilevel model (shared
representation x, one logistic head y^j per task) and
`bilevel_jax._src.meta.episodes` for N-way M-shot episodes from digits,
MNIST, a synthetic task family or a local Omniglot folder.
"""

from bilevel_jax._src.meta.episodes import Episodes
from bilevel_jax._src.meta.episodes import load_omniglot
from bilevel_jax._src.meta.episodes import sample_episodes
from bilevel_jax._src.meta.episodes import split_classes
from bilevel_jax._src.meta.episodes import synthetic_classes
from bilevel_jax._src.meta.fewshot import accuracy
from bilevel_jax._src.meta.fewshot import adapt
from bilevel_jax._src.meta.fewshot import batched_hypergradient
from bilevel_jax._src.meta.fewshot import cross_entropy
from bilevel_jax._src.meta.fewshot import evaluate
from bilevel_jax._src.meta.fewshot import init_heads
from bilevel_jax._src.meta.fewshot import init_representation
from bilevel_jax._src.meta.fewshot import lower_smoothness
from bilevel_jax._src.meta.fewshot import represent
from bilevel_jax._src.meta.fewshot import task_hypergradient
from bilevel_jax._src.meta.fewshot import task_lower
from bilevel_jax._src.meta.fewshot import task_upper

__all__ = [
  "Episodes",
  "accuracy",
  "adapt",
  "batched_hypergradient",
  "cross_entropy",
  "evaluate",
  "init_heads",
  "init_representation",
  "load_omniglot",
  "lower_smoothness",
  "represent",
  "sample_episodes",
  "split_classes",
  "synthetic_classes",
  "task_hypergradient",
  "task_lower",
  "task_upper",
]
