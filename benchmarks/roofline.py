"""Roofline estimates for GPU timings: bytes moved / bandwidth, FLOPs / peak.

The lower bound on a program's run time is max(bytes / B, flops / P), with B
the memory bandwidth and P the peak arithmetic rate of the device. We take
bytes and FLOPs from XLA's cost analysis of the compiled program. XLA counts
a loop body once, whatever its trip count, so the program analyzed must have
its loops unrolled (``bda.solve(..., unroll=True)``); the timed program may
keep its loop. (The scaling suite extrapolates the cost of K unrolled steps
from 1 and 2 steps, which is exact for a repeated step.) XLA's "bytes accessed" sums the operands and results of every
fused kernel: it assumes no reuse through caches, so for data that fits in
L2 (the H100's is 50 MB) the true HBM traffic is lower and the bound looser.

Peaks are the vendors' spec sheets (dense, without sparsity); the bandwidth
is also measured here with a large copy, which is what a program can reach.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# device_kind substring -> (HBM bytes/s, fp32 FLOP/s (no tensor cores), fp64 FLOP/s).
# Sources: NVIDIA H100, H200 and A100 datasheets (SXM forms unless named).
SPEC_PEAKS = {
  "H100 PCIe": (2.0e12, 51e12, 26e12),
  "H100": (3.35e12, 67e12, 34e12),
  "H200": (4.8e12, 67e12, 34e12),
  "A100-PCIE-40GB": (1.555e12, 19.5e12, 9.7e12),
  "A100-SXM4-40GB": (1.555e12, 19.5e12, 9.7e12),
  "A100": (2.039e12, 19.5e12, 9.7e12),
}


def spec_peaks(device=None) -> dict | None:
  """The spec-sheet peaks of ``device`` (default: the first), or None."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for key, (bandwidth, fp32, fp64) in SPEC_PEAKS.items():
    if key.lower() in kind.lower():
      return {
        "source": f"spec sheet ({key})",
        "bandwidth_Bps": bandwidth,
        "fp32_flops": fp32,
        "fp64_flops": fp64,
      }
  return None


def measured_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
  """Bytes/s of a device-to-device elementwise copy (counting read + write)."""
  n = num_bytes // 8  # float32: read 4 bytes and write 4 bytes per element
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda a: a * 2.0)
  jax.block_until_ready(copy(x))
  best = float("inf")
  for _ in range(repeats):
    tic = time.perf_counter()
    jax.block_until_ready(copy(x))
    best = min(best, time.perf_counter() - tic)
  del x
  return 8 * n / best


def cost(compiled) -> dict:
  """FLOPs and bytes accessed of a compiled executable (XLA cost analysis)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return {"flops": None, "bytes": None}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": analysis.get("flops"), "bytes": analysis.get("bytes accessed")}


def estimate(
  seconds: float,
  flops: float | None,
  num_bytes: float | None,
  peaks: dict,
  *,
  dtype: Any = jnp.float32,
  bandwidth: float | None = None,
) -> dict[str, Any]:
  """Roofline bound and the fraction of it a measured time achieves.

  Args:
    seconds: the measured median run time.
    flops, num_bytes: the program's FLOPs and bytes moved.
    peaks: from `spec_peaks`.
    dtype: picks the fp32 or fp64 peak.
    bandwidth: bytes/s to use instead of the spec sheet's (e.g. measured).

  Returns:
    memory_bound_s = bytes / bandwidth, compute_bound_s = flops / peak,
    roofline_s = their max, roofline_fraction = roofline_s / seconds (1 is the
    bound; 0.33 is "within 3x"), and which bound dominates.
  """
  bw = bandwidth or peaks["bandwidth_Bps"]
  peak = peaks["fp64_flops"] if jnp.dtype(dtype) == jnp.float64 else peaks["fp32_flops"]
  memory_s = None if num_bytes is None else num_bytes / bw
  compute_s = None if flops is None else flops / peak
  bounds = [b for b in (memory_s, compute_s) if b is not None]
  bound = max(bounds) if bounds else None
  return {
    "flops": flops,
    "bytes": num_bytes,
    "bandwidth_Bps": bw,
    "peak_flops": peak,
    "memory_bound_s": memory_s,
    "compute_bound_s": compute_s,
    "roofline_s": bound,
    "bound_by": None if bound is None else ("memory" if bound == memory_s else "compute"),
    "roofline_fraction": None if bound is None else bound / seconds,
    "achieved_Bps": None if num_bytes is None else num_bytes / seconds,
    "achieved_flops": None if flops is None else flops / seconds,
  }
