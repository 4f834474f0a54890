"""Private implementation modules; the public API is re-exported by `bilevel_jax`."""
