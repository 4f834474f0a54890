"""The papers' experiments, one module each, run from a clone of the repository.

``python -m experiments run configs/<name>.toml``. Not part of the installed
package: the library is ``bilevel_jax``; this folder reproduces the papers
with it. ``config`` is the one TOML config reader (benchmarks use it too).
"""
