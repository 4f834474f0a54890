"""Few-shot meta-learning: episodes, datasets and the bilevel model."""
