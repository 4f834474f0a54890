"""Hyper-cleaning hypergradient benchmark (issue: BDA foundation).

1. Time per hypergradient and compile time against K for RHG, T-RHG, BDA.
2. 16 instances (different x) in one vmapped call against 16 separate calls
   of the jitted single-instance function, alternating, as a ratio of medians.
3. Memory of the compiled hypergradient against K without and with
   checkpointing (XLA's buffer assignment: temp + argument + output bytes).

Usage: python benchmarks/bench_hypercleaning.py [configs/bench/hypercleaning.toml]
Writes benchmarks/results/hypercleaning_<platform>_<device>.json.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from bilevel_jax import bda, data, schedules  # noqa: E402
from bilevel_jax._src import config  # noqa: E402
from bilevel_jax.problems import HyperCleaning  # noqa: E402

F = config.Field
SCHEMA = {
    "data": {"dataset": F("str", "mnist5k", config.one_of(*data.DATASETS)),
             "n_train": F("int", 2000, config.positive), "n_val": F("int", 200, config.positive)},
    "timing": {"K": F("list[int]", [50, 100], config.positive),
               "methods": F("list[str]", ["rhg", "trhg", "bda"], config.one_of("rhg", "trhg", "bda")),
               "truncate": F("int", 25, config.positive),
               "repeats": F("int", 5, config.positive)},
    "vmap": {"instances": F("int", 16, config.positive), "K": F("int", 100, config.positive),
             "repeats": F("int", 7, config.positive)},
    "memory": {"K": F("list[int]", [50, 100], config.positive),
               "checkpoint": F("list[str]", ["none", "sqrt", "step"],
                               config.one_of("none", "sqrt", "step"))},
}
CHECKPOINT = {"none": False, "sqrt": "sqrt", "step": True}


def load_problem(cfg):
  name = cfg["data"]["dataset"]
  try:
    feats, labels = data.load(name)
  except ImportError:
    name = "digits"
    feats, labels = data.load(name)
  n_train, n_val = cfg["data"]["n_train"], cfg["data"]["n_val"]
  if name == "digits":
    n_train, n_val = min(n_train, 1000), min(n_val, 50)
  split = data.hypercleaning_split(feats, labels, n_train=n_train, n_val=n_val, seed=0)
  return name, HyperCleaning(jax.tree_util.tree_map(jnp.asarray, split))


def method_kwargs(method, K, truncate):
  if method == "rhg":
    return {"alpha": 0.0}
  if method == "trhg":
    return {"alpha": 0.0, "truncate": min(truncate, K)}
  return {"alpha": schedules.harmonic(0.5)}


def main(path):
  with open(path, "rb") as handle:
    raw = config.tomllib.load(handle)
  raw.pop("description", None)
  cfg = config.validate(raw, SCHEMA, path)
  dataset, prob = load_problem(cfg)
  s = 4.0 / prob.lower_smoothness()
  y0 = prob.init_params(10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=prob.data.y_train.size),
                  prob.data.x_train.dtype)
  out = {"machine": _common.machine(), "config": cfg, "dataset": dataset,
         "n_train": int(prob.data.y_train.size), "features": int(prob.data.x_train.shape[1]),
         "timing": [], "vmap": None, "memory": []}

  def hypergradient(K, checkpoint=False, **kw):
    return lambda x: bda.hypergradient(prob.upper, prob.lower, x, y0, steps=K, upper_lr=s,
                                       lower_lr=s, checkpoint=checkpoint, **kw)

  t = cfg["timing"]
  for K in t["K"]:
    for method in t["methods"]:
      compiled, compile_s = _common.compile_fn(hypergradient(K, **method_kwargs(method, K, t["truncate"])), x)
      _common.time_call(compiled, x)  # warm-up
      samples = [_common.time_call(compiled, x) for _ in range(t["repeats"])]
      row = {"method": method, "K": K, "compile_s": compile_s, **_common.summarize(samples)}
      row["ms_per_lower_step"] = 1e3 * row["median_s"] / K
      out["timing"].append(row)
      print(f"timing {method:5s} K={K:4d}: {1e3 * row['median_s']:9.2f} ms/hypergradient "
            f"(compile {compile_s:.2f} s)", flush=True)

  v = cfg["vmap"]
  xs = jnp.asarray(np.random.default_rng(1).normal(size=(v["instances"], x.size)), x.dtype)
  single, _ = _common.compile_fn(hypergradient(v["K"], alpha=schedules.harmonic(0.5)), x)
  batched, batched_compile = _common.compile_fn(
      jax.vmap(hypergradient(v["K"], alpha=schedules.harmonic(0.5))), xs)
  loop = lambda xs: [single(xi) for xi in xs]
  rows = [xs[i] for i in range(v["instances"])]
  _common.time_call(batched, xs)
  _common.time_call(loop, rows)
  t_vmap, t_loop = [], []
  for _ in range(v["repeats"]):  # alternate to share the machine's noise
    t_vmap.append(_common.time_call(batched, xs))
    t_loop.append(_common.time_call(loop, rows))
  out["vmap"] = {"instances": v["instances"], "K": v["K"], "vmapped": _common.summarize(t_vmap),
                 "loop_of_jitted_calls": _common.summarize(t_loop),
                 "vmapped_compile_s": batched_compile}
  ratio = out["vmap"]["loop_of_jitted_calls"]["median_s"] / out["vmap"]["vmapped"]["median_s"]
  out["vmap"]["speedup_loop_over_vmap"] = ratio
  print(f"vmap {v['instances']} instances K={v['K']}: vmapped "
        f"{1e3 * out['vmap']['vmapped']['median_s']:.1f} ms, loop "
        f"{1e3 * out['vmap']['loop_of_jitted_calls']['median_s']:.1f} ms, ratio {ratio:.2f}x",
        flush=True)

  m = cfg["memory"]
  for K in m["K"]:
    for ck in m["checkpoint"]:
      fn = hypergradient(K, checkpoint=CHECKPOINT[ck], alpha=schedules.harmonic(0.5))
      compiled = jax.jit(fn).lower(x).compile()
      mem = compiled.memory_analysis()
      row = {"K": K, "checkpoint": ck}
      for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                    "generated_code_size_in_bytes"):
        row[field] = int(getattr(mem, field, -1)) if mem is not None else -1
      row["total_mib"] = (row["temp_size_in_bytes"] + row["argument_size_in_bytes"]
                          + row["output_size_in_bytes"]) / 2 ** 20
      out["memory"].append(row)
      print(f"memory K={K:4d} checkpoint={ck:5s}: {row['total_mib']:8.2f} MiB", flush=True)

  target = _common.results_path("hypercleaning")
  _common.report.write_json(target, out)
  print(f"wrote {target}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench",
      "hypercleaning.toml"))
