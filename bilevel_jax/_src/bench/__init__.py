"""The benchmark runner behind ``bilevel-jax bench CONFIG`` (private)."""
