"""How the benchmarks measure: compile time, run time, memory, the machine.

Compile time is ``jax.jit(f).lower(*args).compile()``, measured apart from
run time. Run time is the wall time of a call wrapped in
``jax.block_until_ready``, after a warm-up call. When two implementations
are compared, their repeats alternate (A B A B ...) so that both see the same
noise of a shared machine, and the comparison is a ratio of medians.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from typing import Any
from collections.abc import Callable

import jax

from experiments import report


def compile_timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
  """Returns ``(compiled, seconds)`` for ``jax.jit(fn)`` at ``args``."""
  tic = time.perf_counter()
  compiled = jax.jit(fn, **kwargs).lower(*args).compile()
  return compiled, time.perf_counter() - tic


def time_call(fn: Callable, *args) -> float:
  """Wall seconds of ``fn(*args)`` until every output is ready."""
  tic = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - tic


def time_alternating(
  calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
  """Times each zero-argument call ``repeats`` times, interleaved.

  Each call is run ``warmup`` times first (not recorded). Round r runs every
  call once, in the order given, so slow phases of a shared machine hit all
  of them alike.
  """
  for fn in calls.values():
    for _ in range(warmup):
      time_call(fn)
  samples: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      samples[name].append(time_call(fn))
  return samples


def summarize(samples: list[float]) -> dict:
  """Median, quartiles, extremes and count of a list of seconds."""
  ordered = sorted(samples)
  q = lambda p: ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]
  return {
    "median_s": statistics.median(samples),
    "q25_s": q(0.25),
    "q75_s": q(0.75),
    "min_s": ordered[0],
    "max_s": ordered[-1],
    "repeats": len(samples),
  }


def _read_status_kib(field: str) -> float | None:
  try:
    with open("/proc/self/status") as handle:
      for line in handle:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return None


def reset_peak_rss() -> bool:
  """Resets the process's peak resident set (Linux: /proc/self/clear_refs)."""
  try:
    with open("/proc/self/clear_refs", "w") as handle:
      handle.write("5")
    return True
  except OSError:
    return False


def peak_rss_mib() -> float:
  """Peak host resident memory of this process in MiB, since the last reset.

  Without /proc (macOS), the peak since the process started.
  """
  kib = _read_status_kib("VmHWM")
  if kib is not None:
    return kib / 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def peak_memory():
  """Measures the peak host RSS (and device memory, on a GPU) of a block.

  Yields a dict that holds ``peak_rss_mib`` and ``device_peak_mib`` (None on
  a CPU, or where the backend keeps no statistics) once the block ends. The
  device figure is the allocator's peak since the process started, so it is
  exact only for the largest run so far; ``compiled_memory`` gives each
  executable's own footprint.
  """
  out: dict[str, Any] = {}
  exact = reset_peak_rss()
  try:
    yield out
  finally:
    out["peak_rss_mib"] = peak_rss_mib()
    out["peak_rss_exact"] = exact
    out["device_peak_mib"] = device_peak_mib()


def device_peak_mib() -> float | None:
  """The accelerator allocator's peak bytes in use, in MiB, or None."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  try:
    stats = device.memory_stats() or {}
  except Exception:
    return None
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def compiled_memory(compiled) -> dict:
  """XLA's buffer assignment of an executable: temp, argument, output bytes."""
  try:
    mem = compiled.memory_analysis()
  except Exception:
    mem = None
  row = {}
  for field in (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "generated_code_size_in_bytes",
  ):
    row[field] = int(getattr(mem, field, -1)) if mem is not None else -1
  parts = [row["temp_size_in_bytes"], row["argument_size_in_bytes"], row["output_size_in_bytes"]]
  row["compiled_mib"] = sum(parts) / 2**20 if min(parts) >= 0 else None
  return row


def machine() -> dict:
  """Machine, device, JAX version, commit and thread settings of this run."""
  info = report.machine_info()
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    info[var.lower()] = os.environ.get(var, "")
  try:
    info["cpu_affinity"] = len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - macOS
    info["cpu_affinity"] = os.cpu_count()
  return info


def device_tag() -> str:
  """``<platform>_<device kind>`` for result file names, e.g. ``gpu_nvidia_h100``."""
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  kind = "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")
  return f"{device.platform}_{kind}"


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_path(name: str) -> str:
  """``benchmarks/results/<name>_<device tag>.json``."""
  return os.path.join(RESULTS, f"{name}_{device_tag()}.json")
