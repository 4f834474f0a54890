"""Throughput of sharded meta-learning hypergradients against the number of devices.

For each device count D in the config (CPU: host devices forced with
XLA_FLAGS in a subprocess, meshes over the first D; GPU: the devices present), one
call of the sharded BDA/RHG hypergradient of the few-shot problem on B
episodes (`bilevel_jax.meta`, BDA Section 5.3) is timed: compile time
(`lower().compile()`) apart from run time (warm-up, then the median of
`block_until_ready` repeats, alternating between the mesh sizes), and tasks
per second = B / median.

Usage: python -m benchmarks.bench_sharding [configs/bench/sharding.toml]
Writes benchmarks/results/sharding_<platform>_<device>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import timing
from experiments import report

from bilevel_jax import meta, schedules, sharding
from experiments import config

F = config.Field
SCHEMA = {
  "problem": {
    "ways": F("int", 5, config.positive),
    "shots": F("int", 1, config.positive),
    "queries": F("int", 15, config.positive),
    "dim": F("int", 64, config.positive),
    "hidden": F("list[int]", [64, 64], config.positive),
    "K": F("int", 20, config.positive),
    "methods": F("list[str]", ["rhg", "bda"], config.one_of("rhg", "trhg", "bda")),
    "truncate": F("int", 5, config.positive),
  },
  "timing": {
    "devices": F("list[int]", [1, 2, 4], config.positive),
    "tasks": F("list[int]", [64, 256, 1024], config.positive),
    "repeats": F("int", 5, config.positive),
  },
}
SETTINGS = {"rhg": {"alpha": 0.0}, "bda": {"alpha": schedules.harmonic(0.5)}}


def method_kwargs(method, cfg):
  if method == "trhg":
    return {"alpha": 0.0, "truncate": min(cfg["problem"]["truncate"], cfg["problem"]["K"])}
  return SETTINGS[method]


def measure(cfg, counts):
  """Times every (method, tasks) pair on meshes of each size in ``counts``.

  The repeats alternate between the mesh sizes, so that a shared machine's
  load falls on all of them alike.
  """
  p, t = cfg["problem"], cfg["timing"]
  feats, labels = meta.synthetic_classes(num_classes=100, per_class=40, dim=p["dim"], seed=0)
  meshes = {d: sharding.make_mesh(d) for d in counts}
  x0 = meta.init_representation(jax.random.PRNGKey(0), [p["dim"]] + p["hidden"])
  s_l = 2.0 / meta.lower_smoothness(p["hidden"][-1], 1e-3)
  rows = []
  for tasks in t["tasks"]:
    episodes = meta.sample_episodes(
      feats,
      labels,
      np.arange(100),
      ways=p["ways"],
      shots=p["shots"],
      queries=p["queries"],
      num_tasks=tasks,
      rng=np.random.default_rng(tasks),
    )
    heads = jax.tree_util.tree_map(np.asarray, meta.init_heads(tasks, p["hidden"][-1], p["ways"]))
    for method in p["methods"]:
      batched = meta.batched_hypergradient(
        l2=1e-3, steps=p["K"], upper_lr=s_l, lower_lr=s_l, **method_kwargs(method, cfg)
      )
      calls, compile_s = {}, {}
      for d, mesh in meshes.items():
        args = (
          sharding.replicate(x0, mesh),
          sharding.process_local_batch(heads, mesh),
          sharding.process_local_batch(episodes, mesh),
        )
        fn = sharding.shard_hypergradient(batched, mesh, in_axes=(None, 0, 0), reduce="mean")
        compiled, compile_s[d] = timing.compile_timed(fn, *args)
        timing.time_call(compiled, *args)  # warm-up
        calls[d] = (compiled, args)
      samples = {d: [] for d in counts}
      for _ in range(t["repeats"]):
        for d, (compiled, args) in calls.items():
          samples[d].append(timing.time_call(compiled, *args))
      for d in counts:
        row = {
          "devices": d,
          "method": method,
          "tasks": tasks,
          "compile_s": compile_s[d],
          **timing.summarize(samples[d]),
        }
        row["tasks_per_s"] = tasks / row["median_s"]
        rows.append(row)
        print(
          f"D={d} {method:4s} B={tasks:4d}: {1e3 * row['median_s']:9.2f} ms, "
          f"{row['tasks_per_s']:9.1f} tasks/s (compile {compile_s[d]:.2f} s)",
          file=sys.stderr,
          flush=True,
        )
  return rows


def main(path, devices_override=None):
  raw = config.read_toml(path)
  raw.pop("description", None)
  cfg = config.validate(raw, SCHEMA, path)
  counts = devices_override or cfg["timing"]["devices"]
  platform = jax.default_backend()
  if platform == "cpu":
    # XLA fixes the number of host devices when the backend starts: one
    # subprocess with as many as the largest mesh needs.
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={max(counts)}")
    out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--worker", ",".join(map(str, counts)), path],
      env=env,
      stdout=subprocess.PIPE,
      check=True,
      text=True,
    )
    rows = json.loads(out.stdout)
  else:
    present = [c for c in counts if c <= jax.device_count()]
    for count in sorted(set(counts) - set(present)):
      print(f"skipping D={count}: only {jax.device_count()} {platform} device(s)", file=sys.stderr)
    rows = measure(cfg, present)
  base = {(r["method"], r["tasks"]): r["tasks_per_s"] for r in rows if r["devices"] == 1}
  for row in rows:
    ref = base.get((row["method"], row["tasks"]))
    row["speedup_vs_1_device"] = row["tasks_per_s"] / ref if ref else None
  machine = timing.machine()
  machine["cpu_count"] = os.cpu_count()
  if platform == "cpu":
    machine["xla_flags"] = f"--xla_force_host_platform_device_count={max(counts)}"
  out = {
    "machine": machine,
    "config": cfg,
    "rows": rows,
    "note": (
      "CPU host devices share the machine's cores: with few physical cores the "
      "speedup from more devices is bounded by them, not by the sharding."
    )
    if platform == "cpu"
    else "",
  }
  target = timing.results_path("sharding")
  report.write_json(target, out)
  print(f"wrote {target}")


if __name__ == "__main__":
  args = sys.argv[1:]
  default = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench", "sharding.toml"
  )
  if args and args[0] == "--worker":
    counts, path = [int(v) for v in args[1].split(",")], args[2]
    raw = config.read_toml(path)
    raw.pop("description", None)
    print(json.dumps(measure(config.validate(raw, SCHEMA, path), counts)))
  elif args and args[0] == "--devices":
    main(args[2] if len(args) > 2 else default, [int(v) for v in args[1].split(",")])
  else:
    main(args[0] if args else default)
