"""Benchmark suites: each module has ``SCHEMA``, ``TITLE`` and ``run(cfg, ctx)``."""
