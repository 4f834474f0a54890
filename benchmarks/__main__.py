"""``python -m benchmarks CONFIG``: run the benchmark a TOML config in ``configs/bench/`` names.

A config with a top-level ``suite`` key runs that suite in this process and
writes ``benchmarks/results/<config>_<device>.{json,md,png}``; a config
without one is run by its standalone script ``benchmarks/bench_<config>.py``
(in a process of its own, e.g. because it sets ``XLA_FLAGS`` before JAX starts).
"""

from benchmarks.runner import main

raise SystemExit(main())
