"""Few-shot meta-learning (BDA paper, Section 5.3).

See `bilevel_jax._src.meta.fewshot` for the bilevel model (shared
representation x, one logistic head y^j per task) and
`bilevel_jax._src.meta.episodes` for N-way M-shot episodes from digits,
MNIST, a synthetic task family or a local Omniglot folder;
`bilevel_jax._src.meta.maml` for second-order MAML on the same model.
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
from bilevel_jax._src.meta.maml import init_maml
from bilevel_jax._src.meta.maml import maml_adapt
from bilevel_jax._src.meta.maml import maml_batched_hypergradient
from bilevel_jax._src.meta.maml import maml_evaluate
from bilevel_jax._src.meta.maml import maml_task_loss

__all__ = [
  "Episodes",
  "accuracy",
  "adapt",
  "batched_hypergradient",
  "cross_entropy",
  "evaluate",
  "init_heads",
  "init_maml",
  "init_representation",
  "load_omniglot",
  "lower_smoothness",
  "maml_adapt",
  "maml_batched_hypergradient",
  "maml_evaluate",
  "maml_task_loss",
  "represent",
  "sample_episodes",
  "split_classes",
  "synthetic_classes",
  "task_hypergradient",
  "task_lower",
  "task_upper",
]
