"""Timing helpers shared by the benchmark scripts.

Compile time is measured with ``jax.jit(f).lower(*args).compile()``; run time
with a warm-up call, then ``jax.block_until_ready`` around each repeat.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bilevel_jax._src import report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def compile_fn(fn, *args):
  """Returns (compiled executable, compile seconds)."""
  tic = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - tic


def time_call(fn, *args) -> float:
  tic = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - tic


def summarize(samples: list[float]) -> dict:
  ordered = sorted(samples)
  q = lambda p: ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]
  return {"median_s": statistics.median(samples), "min_s": ordered[0], "max_s": ordered[-1],
          "q25_s": q(0.25), "q75_s": q(0.75), "repeats": len(samples)}


def machine() -> dict:
  info = report.machine_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return info


def results_path(name: str) -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform).replace(" ", "_").lower()
  return os.path.join(RESULTS, f"{name}_{device.platform}_{kind}.json")
