"""Plain-text tables, JSON results and optional PNG figures for experiments."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any

import jax

from experiments import jax_cache


def _fmt(value: Any) -> str:
  if isinstance(value, float) and value != value:  # NaN: no value (e.g. a row the paper lacks)
    return "–"
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, list):
    return "(" + ", ".join(_fmt(v) for v in value) + ")"
  return str(value)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
  cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
  widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
  line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"
  out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(r) for r in cells]
  return "\n".join(out)


def git_commit() -> str:
  try:
    return subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5
    ).stdout.strip()
  except Exception:
    return "unknown"


def cpu_model() -> str:
  """The CPU's model name, family and model numbers and its widest vector
  extension (Linux's /proc/cpuinfo; "" elsewhere): two runs on machines of
  one name but other CPUs are not comparable."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
      text = handle.read()
  except OSError:
    return ""
  fields: dict = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get("flags", "").split())
  vector = next((f for f in ("amx_tile", "avx512f", "avx2", "sse4_2") if f in flags), "")
  return (
    f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, "
    f"model {fields.get('model', '?')}, {vector or 'no AVX'})"
  )


def machine_info() -> dict:
  device = jax.devices()[0]
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
    "x64": bool(jax.config.jax_enable_x64),
    "commit": git_commit(),
    # A warm persistent cache makes compile times load times: say which.
    "compilation_cache": jax_cache.active(),
  }


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as handle:
    json.dump(payload, handle, indent=1, default=float)
  os.replace(tmp, path)


def save_figures(out_dir: str, figures: dict) -> list[str]:
  """Draws each figure to PNG when matplotlib is installed; returns the paths."""
  if not figures:
    return []
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  paths = []
  for name, draw in figures.items():
    fig = draw(plt)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
