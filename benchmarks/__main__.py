"""``python -m benchmarks CONFIG``: run the benchmark a TOML config in ``configs/bench/`` names.

A config with a top-level ``suite`` key runs that suite in this process and
writes ``benchmarks/results/<config>_<device>.{json,md,png}``; a config
without one is run by its standalone script ``benchmarks/bench_<config>.py``
(in a process of its own, e.g. because it sets ``XLA_FLAGS`` before JAX starts).

JAX's persistent compilation cache is on (`experiments.jax_cache`): a second
run of a config loads its programs instead of compiling them, so its
``compile_s`` columns are load times; the results record the cache directory
(``compilation_cache``). ``BILEVEL_JAX_NO_CACHE=1`` turns it off.
"""

from benchmarks.runner import main
from experiments import jax_cache

jax_cache.enable()  # compiled programs are reused by the next run (BILEVEL_JAX_NO_CACHE=1: off)
raise SystemExit(main())
