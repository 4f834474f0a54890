"""Experiments run by the CLI (`bilevel-jax run CONFIG`), one module each."""
