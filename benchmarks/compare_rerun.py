"""Reruns fast experiment configs and compares their rows with the committed
results (benchmarks/results/experiments/<config>/results.json): every
number except timings, and every string (statuses, labels).

    python benchmarks/compare_rerun.py example1 quadratic:x64 hypercleaning_digits

An API change that must keep the numbers (issue 11) is checked with it. A
config name with ``:x64`` reruns in float64 (as the committed run was).
Writes benchmarks/results/compare_rerun.json with the machine and commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {
  "ms_per_step",
  "ms_per_upper_step",
  "compile_s",
  "run_s",
  "seconds",
  "time_s",
  "wall_s",
  "step_time",
}


def compare(new, old, path="rows"):
  """(numbers compared, worst relative difference, differences above 1e-6)."""
  count, worst, diffs = 0, 0.0, []
  if isinstance(new, dict):
    for key in new:
      if key in TIMING_KEYS or key not in old:
        continue
      c, w, d = compare(new[key], old[key], f"{path}.{key}")
      count, worst, diffs = count + c, max(worst, w), diffs + d
  elif isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
    for i, (a, b) in enumerate(zip(new, old)):
      c, w, d = compare(a, b, f"{path}[{i}]")
      count, worst, diffs = count + c, max(worst, w), diffs + d
  elif (
    isinstance(new, (int, float)) and isinstance(old, (int, float)) and not isinstance(new, bool)
  ):
    if not (math.isnan(new) and math.isnan(old)):
      rel = abs(new - old) / max(1e-300, abs(new), abs(old)) if new != old else 0.0
      count, worst = 1, rel
      if rel > 1e-6:
        diffs.append([path, new, old])
  elif new != old:
    diffs.append([path, new, old])
  return count, worst, diffs


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="+", help="config stems, e.g. example1 quadratic:x64")
  parser.add_argument(
    "--out", default=os.path.join(REPO, "benchmarks", "results", "compare_rerun.json")
  )
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  from experiments import report

  entries = []
  for item in args.configs:
    stem, _, flag = item.partition(":")
    committed = os.path.join(REPO, "benchmarks", "results", "experiments", stem, "results.json")
    with tempfile.TemporaryDirectory() as out:
      command = [
        sys.executable,
        "-m",
        "experiments",
        "run",
        os.path.join(REPO, "configs", f"{stem}.toml"),
        "--out",
        out,
        "--quiet",
        "--no-plot",
      ] + (["--x64"] if flag == "x64" else [])
      subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
      with open(os.path.join(out, "results.json")) as handle:
        new = json.load(handle)
    with open(committed) as handle:
      old = json.load(handle)
    count, worst, diffs = compare(new["rows"], old["rows"])
    entries.append(
      {
        "config": stem,
        "x64": flag == "x64",
        "numbers_compared": count,
        "worst_relative_difference": worst,
        "differences": diffs,
        "committed_commit": old.get("machine", {}).get("commit"),
      }
    )
    print(
      f"{stem}: {count} numbers, worst relative difference {worst:.2e}, "
      f"{len(diffs)} differences above 1e-6"
    )
  report.write_json(args.out, {"machine": report.machine_info(), "comparisons": entries})
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
