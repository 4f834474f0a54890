"""Benchmarks of bilevel_jax: suites, peer scripts and standalone scripts.

Not part of the installed package; run from a clone of the repository with
``python -m benchmarks configs/bench/<name>.toml``. ``timing`` is the one
timing harness; configs are read by ``experiments.config``.
"""
