"""The Performance tables of docs/performance.md and the README's headline results,
generated from the committed JSON.

    python benchmarks/performance_tables.py            # print the tables
    python benchmarks/performance_tables.py --write    # rewrite docs/performance.md and README.md

Every number in the Performance page comes from a file under
benchmarks/results/ through this script; `tests/test_docs.py` checks that the
page holds exactly what it prints.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
GPU = "gpu_nvidia_h100_80gb_hbm3"


def _load(name: str):
  path = os.path.join(RESULTS, name)
  if not os.path.exists(path):
    return None
  with open(path) as handle:
    return json.load(handle)


def _ms(seconds) -> str:
  if seconds is None:
    return "–"
  ms = 1e3 * seconds
  return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(ratio) -> str:
  return "–" if ratio is None else f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _source(payload, name: str) -> str:
  m = payload["machine"]
  return (
    f"`{payload['config'] if 'config' in payload else ''}` → `benchmarks/results/{name}` "
    f"({m['device']}, JAX {m['jax']}, commit {m['commit']})"
  )


def boat_section() -> str:
  name = "hypercleaning_peers_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return "BOAT: no committed result yet."
  ours = {(r["method"], r["size"]): r for r in d["rows"] if r["impl"] == "bilevel_jax"}
  peer = {(r["method"], r["size"]): r for r in d["rows"] if r["impl"] != "bilevel_jax"}
  rows = []
  for key in sorted(ours, key=lambda k: (k[0], k[1])):
    o, p = ours[key], peer.get(key)
    rows.append(
      [
        key[0],
        key[1],
        _ms(o["median_s"]),
        _ms(p and p["median_s"]),
        _x(p and p["median_s"] / o["median_s"]),
        f"{o['metric']:.2f} / {p['metric']:.2f}" if p else f"{o['metric']:.2f} / –",
      ]
    )
  iters = next(iter(ours.values())).get("upper_iterations")
  return (
    f"**BOAT** (PyTorch, CPU), data hyper-cleaning, time per upper iteration "
    f"(median over {iters} upper iterations per sweep), {_source(d, name)}:\n\n"
    + _table(
      ["method (ours vs BOAT)", "K", "ours ms", "BOAT ms", "speedup", "test acc % ours / BOAT"],
      rows,
    )
  )


def jaxopt_section() -> str:
  name = "implicit_peers_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return "jaxopt: no committed result yet."
  rows = []
  for r in d["rows"]:
    if r.get("per") != "matched_accuracy" or r["size"] not in (1e-4, 1e-8):
      continue
    rows.append(
      [
        r["problem"],
        r["method"].replace(" matched", ""),
        f"{r['size']:.0e}",
        f"{_ms(r['median_s'])} ({r['setting']})",
        f"{_ms(r['peer_median_s'])} ({r['peer_setting']})",
        _x(r["speedup"]),
      ]
    )
  speedups = [r["speedup"] for r in d["rows"] if r.get("per") == "matched_accuracy"]
  return (
    f"**jaxopt** implicit differentiation (`custom_root`-style, CG adjoint) against "
    f"`bilevel_jax.implicit`, float64, the fastest setting of each side that reaches the "
    f"target hypergradient error; {_source(d, name)}:\n\n"
    + _table(
      [
        "problem",
        "lower solver",
        "target error",
        "ours ms (setting)",
        "jaxopt ms (setting)",
        "speedup",
      ],
      rows,
    )
    + f"\n\nOver every matched row the speedup ranges from {min(speedups):.2f}× to "
    f"{max(speedups):.2f}×."
  )


def jaxopt_run_section() -> str:
  """The full upper run against jaxopt: time per upper step at matched error."""
  name = "implicit_peers_run_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return ""
  exact = [
    r
    for r in d["rows"]
    if r.get("per") == "upper_step_matched"
    and "shine" not in r["method"]
    and r["method"] != "upper run cg matched"
  ]
  rows = [
    [
      r["problem"],
      r["method"].replace("upper run ", "").replace(" matched", ""),
      f"{r['size']:.0e}",
      f"{_ms(r['median_s'])} ({r['setting']})",
      f"{_ms(r.get('peer_median_s'))} ({r.get('peer_setting', '–')})",
      _x(r.get("speedup")),
      _x(r.get("speedup_vs_jaxopt_previous_y")),
    ]
    for r in exact
  ]
  steps = [
    [
      r["problem"],
      r["impl"] + ("" if r["impl"] == "jaxopt" else " " + r["method"].replace("upper run ", "")),
      f"{r['size']:g} / {r['linear_tol']:g}",
      f"{r['lower_steps']:.1f}",
      "–" if r.get("linear_steps") is None else f"{r['linear_steps']:.1f}",
      _ms(r["median_s"]),
      f"{r['metric']:.1e}",
    ]
    for r in d["rows"]
    if r.get("per") == "upper_step"
  ]
  st = d["settings"]["upper_run"]
  best = [r["speedup"] for r in exact if r.get("speedup")]
  load = d.get("load_average", {})
  return (
    f"**jaxopt over a full upper run**: {st['steps']} Adam steps (learning rate "
    f"{st['learning_rate']:g}) on x, each lower solve from the previous y* on both sides "
    "(jaxopt: `init_params`), ours also starting CG from the previous adjoint (`_warm`; "
    "jaxopt's `custom_root` cannot warm-start its CG) and, for `pcg`, preconditioning it by "
    "the L-BFGS memory (SHINE); `extrap2`: both solves of ours start from the quadratic "
    "extrapolation 3 s_t - 3 s_{t-1} + s_{t-2} of the last solutions "
    "(`upper.make_step(..., extrapolate=2)`), and jaxopt gets the same extrapolated "
    "`init_params` (speedup), or its plain previous y* (last column). "
    "Time per upper step at matched median hypergradient error "
    f"(each step's error against an exact one); {_source(d, name)}; 1-minute load average "
    f"{load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end on a shared 2-core machine "
    "(times are noisy: quartiles in the JSON):\n\n"
    + _table(
      [
        "problem",
        "our adjoint",
        "target error",
        "ours ms/step (setting)",
        "jaxopt ms/step (setting, same lower start)",
        "speedup",
        "vs jaxopt from the previous y*",
      ],
      rows,
    )
    + (
      f"\n\nSpeedups of the exact options range from {min(best):.2f}× to {max(best):.2f}×."
      if best
      else ""
    )
    + " Where the time goes (mean iterations per upper step; `shine` is an approximation, "
    "its error is the last column):\n\n"
    + _table(
      ["problem", "implementation", "tol / linear_tol", "lower", "adjoint CG", "ms/step", "error"],
      steps,
    )
  )


def cvxpy_section() -> str:
  name = "composite_peers_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return "cvxpy: no committed result yet."
  ours = {r["size"]: r for r in d["rows"] if r["impl"] == "bilevel_jax"}
  rows = []
  for p in (r for r in d["rows"] if r["impl"] == "cvxpy"):
    o = ours[p["size"]]
    rows.append(
      [
        p["size"],
        _ms(o["median_s"]),
        _ms(p["median_s"]),
        _x(p["speedup"]),
        f"{o['metric']:.3f} / {p['metric']:.3f}",
        f"{o['iterations']} / {p['iterations']}",
      ]
    )
  summary = d["summary"]
  solver = next((r.get("solver") for r in d["rows"] if r["impl"] == "cvxpy"), "")
  return (
    f"**cvxpy** (the composite paper's approach: every lower level solved by cvxpy "
    f"({solver}) inside the same Algorithm 1 written in NumPy, with the same random "
    f"samples) against warm-started `composite.solve` + `upper.gradient_sampling` in one "
    f"jitted call per instance, elastic net (6.1); {_source(d, name)}:\n\n"
    + _table(
      [
        "instance",
        "ours ms",
        "cvxpy ms",
        "speedup",
        "validation error ours / cvxpy",
        "iterations ours / cvxpy",
      ],
      rows,
    )
    + f"\n\nMedian speedup {_x(summary.get('speedup_median'))}. Ours over all "
    f"{len(ours)} instances: median {_ms(summary['ours_median_s'])} ms per instance, mean "
    f"validation error {summary['ours_mean_validation_error']:.3f} and test error "
    f"{summary['ours_mean_test_error']:.3f}."
  )


def vmap_section() -> str:
  rows = []
  sources = []
  for tag, label in (("cpu_cpu", "CPU (2 cores)"), (GPU, "H100")):
    name = f"scaling_gpu_{tag}.json" if tag == GPU else f"scaling_{tag}.json"
    d = _load(name)
    if d is None:
      continue
    sources.append(_source(d, name))
    vm = {
      r["size"]: r
      for r in d["rows"]
      if r["size_name"] == "instances" and r["method"].startswith("vmap")
    }
    lp = {
      r["size"]: r
      for r in d["rows"]
      if r["size_name"] == "instances" and r["method"].startswith("loop")
    }
    for n in sorted(vm):
      if n in (1, 16, 256, 1024):
        rows.append(
          [label, n, _ms(vm[n]["median_s"]), _ms(lp[n]["median_s"]), _x(vm[n]["speedup"])]
        )
  return (
    "**Many small problems in one call**: N ridge problems (y of dimension 10, 20 "
    "samples, BDA with K = 50) in one `jax.jit(jax.vmap(...))` call against a Python "
    "loop of N calls of the jitted single-instance function, alternated; "
    + "; ".join(sources)
    + ":\n\n"
    + _table(["machine", "N", "vmapped ms", "loop ms", "speedup"], rows)
  )


def k_section() -> str:
  rows = []
  sources = []
  for name, label in (("scaling_cpu_cpu.json", "CPU"), (f"scaling_gpu_{GPU}.json", "H100")):
    d = _load(name)
    if d is None:
      continue
    sources.append(_source(d, name))
    for r in d["rows"]:
      if r["size_name"] != "K" or "checkpoint" in r["method"] or r["size"] not in (50, 100, 400):
        continue
      roof = r.get("roofline") or {}
      measured = (r.get("roofline_measured_bw") or {}).get("roofline_fraction")
      rows.append(
        [
          label,
          r["method"],
          r["size"],
          r.get("unroll", 1),
          _ms(r["median_s"]),
          _ms(roof.get("memory_bound_s")),
          "–" if not roof else f"{roof['roofline_fraction']:.2f}",
          "–" if measured is None else f"{measured:.2f}",
        ]
      )
  return (
    "**Time per hypergradient against K** (hyper-cleaning on mnist5k: 2000 × 784, 10 "
    "classes, float32); on the GPU with the roofline bound (bytes from XLA's cost "
    "analysis ÷ 3.35 TB/s spec bandwidth) and the fraction of it reached (1 = at the "
    "bound), also against the 2.07 TB/s a copy reaches; "
    + "; ".join(sources)
    + ":\n\n"
    + _table(
      [
        "device",
        "method",
        "K",
        "unroll",
        "ms",
        "bandwidth bound ms",
        "fraction (spec)",
        "fraction (measured bw)",
      ],
      rows,
    )
  )


def memory_section() -> str:
  name = "scaling_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return ""
  table: dict = {}
  for r in d["rows"]:
    if "checkpoint=" in r["method"]:
      table.setdefault(r["size"], {})[r["method"].split("=")[1]] = r["compiled_mib"]
  rows = [
    [k, *(f"{table[k].get(c, float('nan')):.1f}" for c in ("none", "sqrt", "step"))]
    for k in sorted(table)
  ]
  return (
    "**Memory against K** (BDA hypergradient, XLA's buffer assignment in MiB; "
    f"{_source(d, name)}):\n\n"
    + _table(["K", "no checkpointing", "checkpoint='sqrt'", "checkpoint=True"], rows)
  )


_COMPILE_COLUMNS = [
  "f32 first call s",
  "f32 run ms",
  "f64 first call s",
  "f64 run ms",
  "target s",
  "meets target",
]


def compile_section() -> str:
  name = "compile_times_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return ""
  by_entry: dict = {}
  for r in d["rows"]:
    if r.get("group", "small") == "small":
      by_entry.setdefault(r["entry_point"], {})[r["dtype"]] = r
  rows = []
  for entry, per in by_entry.items():
    cells = [f"`{entry}`"]
    for dtype in ("float32", "float64"):
      r = per.get(dtype)
      cells += ["–", "–"] if r is None else [f"{r['first_call_s']:.2f}", _ms(r["run_s"])]
    r = per.get("float64") or next(iter(per.values()))
    cells += [
      f"{r['target_s']:.0f}",
      "yes" if all(p["meets_target"] for p in per.values()) else "**no**",
      f"{r['jaxpr_equations']} / {r['hlo_instructions']}",
    ]
    rows.append(cells)
  m = d["machine"]
  return (
    "**Compile time** of every public solver on a small problem (the contract test's "
    "problems): the first call (tracing + lowering + XLA compile, JAX's caches cleared) "
    "and a warm call; `python -m benchmarks.compile_times` → "
    f"`benchmarks/results/{name}` ({m['device']}, JAX {m['jax']}, commit {m['commit']}):"
    "\n\n"
    + _table(
      ["entry point", *_COMPILE_COLUMNS, "jaxpr eqns / HLO instr."],
      rows,
    )
    + "\n\nThese are 3-dimensional problems; a user's first compile grows with the problem "
    "(next table)." + realistic_compile_section(d, name)
  )


def realistic_compile_section(d, name: str) -> str:
  """The compile-time rows of what a new user compiles first (issue 15)."""
  by_entry: dict = {}
  for r in d["rows"]:
    if r.get("group") == "realistic":
      by_entry.setdefault(r["entry_point"], {})[r["dtype"]] = r
  if not by_entry:
    return ""
  rows = []
  for entry, per in by_entry.items():
    cells = [entry]
    for dtype in ("float32", "float64"):
      r = per.get(dtype)
      cells += (
        ["–", "–"]
        if r is None
        else [
          f"{r['first_call_s']:.1f} ({r['compile_s']:.1f}; {r.get('compile_cpu_s', float('nan')):.1f})",
          _ms(r["run_s"]),
        ]
      )
    r = per.get("float64") or next(iter(per.values()))
    traced = ", ".join(f"{k} {v}×" for k, v in sorted(r.get("traced_calls", {}).items()))
    cells += [
      f"{r['target_s']:.0f}",
      "yes" if all(p["meets_target"] for p in per.values()) else "**no**",
      f"{r['jaxpr_equations']} / {r['hlo_instructions']}",
      traced or "–",
    ]
    rows.append(cells)
  m = d["machine"]
  load = ""
  if "loadavg_start" in m:
    load = (
      f" Load average {m['loadavg_start'][0]:.1f} at the start and "
      f"{m['loadavg_end'][0]:.1f} at the end of the run, on {m.get('cpu_count', '?')} cores"
      " shared with other jobs: wall times are noisy, CPU seconds less so."
    )
  return (
    "\n\n**Compile time of what a new user compiles first** (issue 15; the elastic net of "
    "Solla & Royset 6.1 with 10 features, Algorithm 1 with N_sam = 5 around it, an Adam "
    "step of `upper.make_step` around it, an implicit hypergradient of a 64-feature, "
    "10-class logistic regression, a BDA hypergradient of a 784-32-10 MLP with K = 50; "
    f"`python -m benchmarks.compile_times --group realistic` → `benchmarks/results/{name}`)."
    " First call in seconds (XLA compile wall; its CPU seconds); `traced` counts the "
    "traces of the scenario's inner function while the program is traced (gradient "
    "sampling: one of them is the argument check, which adds nothing to the program)."
    + load
    + "\n\n"
    + _table(
      ["scenario", *_COMPILE_COLUMNS, "jaxpr eqns / HLO instr. (f64)", "traced"],
      rows,
    )
    + _limits(by_entry)
  )


def _limits(by_entry: dict) -> str:
  """What limits each scenario that misses its target, from the JSON (float64)."""
  lines = []
  for entry, per in by_entry.items():
    r = per.get("float64") or next(iter(per.values()))
    if all(p["meets_target"] for p in per.values()):
      continue
    subs = r.get("largest_sub_jaxprs") or []
    top = (
      f"; largest sub-jaxpr `{subs[0]['sub_jaxpr']}` ({subs[0]['equations']} eqns)" if subs else ""
    )
    lines.append(
      f"- {entry}: XLA's compile is {r['compile_s'] / r['first_call_s']:.0%} of the first "
      f"call; {r['jaxpr_equations']} jaxpr equations, {r.get('stablehlo_ops', '–')} "
      f"StableHLO ops, {r['hlo_instructions']} optimized HLO instructions{top}."
    )
  if not lines:
    return ""
  return "\n\nWhat limits the rows that miss their target (float64):\n\n" + "\n".join(lines)


def reweighting_section() -> str:
  parts = []
  for name, label in (
    ("reweighting_peers.json", "MLP 784-100-10"),
    ("reweighting_peers_small.json", "MLP 784-32-10"),
  ):
    d = _load(name)
    if d is None:
      continue
    labels = {
      "bilevel_jax_library": "bilevel_jax `bda.hypergradient(lower_optimizer=, lower_batches=)`",
      "bilevel_jax_library_remat": "same, `checkpoint=True`",
      "bilevel_jax_scan": "hand-written `lax.scan` + optax (reference)",
      "bilevel_jax_scan_remat": "same, with `jax.checkpoint`",
      "torchopt": "TorchOpt (`MetaAdam`)",
      "betty": "betty (`IterativeProblem`)",
    }
    rows = []
    for impl, row in d["rows"].items():
      if not isinstance(row, dict) or "cpu_time_per_upper_step" not in row:
        continue
      compile_s = row.get("compile_s")
      rows.append(
        [
          labels.get(impl, impl),
          _ms(row["cpu_time_per_upper_step"]["median_s"]),
          _ms(row["time_per_upper_step"]["median_s"]),
          "–" if not compile_s else f"{statistics.median(compile_s):.1f}",
          f"{100 * statistics.median(row['test_acc']):.2f}",
        ]
      )
    r, st = d["ratios"], d["settings"]
    lib_row = d["rows"]["bilevel_jax_library"]
    faster = r.get("cpu:faster_peer")
    ours = r.get(f"cpu:{faster}/ours")
    remat = r.get(f"cpu:{faster}/library_remat")
    overhead = r.get("cpu:library/scan")
    parts.append(
      f"**Learning to reweight against TorchOpt and betty** ({label}, mnist5k with 40% "
      f"corrupted labels, K = {st['K']} Adam steps on batches of {st['batch']} per upper "
      f"step, RHG, a new validation batch of {st['val_batch']} per step, "
      f"{st['upper_steps']} upper steps, {st['threads']} thread per side, alternating "
      f"processes; `python benchmarks/bench_reweighting_peers.py` → "
      f"`benchmarks/results/{name}` ({d['machine']['device']}, JAX "
      f"{d['machine']['jax']}, commit {d['machine']['commit']}). Process CPU time per "
      "upper step is the figure to compare on this shared machine; wall time beside it:"
      "\n\n"
      + _table(
        ["implementation", "CPU ms / step", "wall ms / step", "compile s", "test acc %"], rows
      )
      + f"\n\nAgainst {faster}, the faster peer, its CPU time per upper step ÷ ours: "
      f"{_x(ours)} ({_x(remat)} with `checkpoint=True`); wall time: "
      f"{_x(r.get(f'wall:{faster}/ours'))}."
      + (
        " Our CPU time exceeds our wall time: XLA ran on more than one core despite the "
        "one-thread setting, so the wall-time ratio is not at equal thread counts."
        if lib_row["cpu_time_per_upper_step"]["median_s"]
        > lib_row["time_per_upper_step"]["median_s"]
        else ""
      )
      + f" The library against the hand-written loop of the same math: {overhead:.3f}× the "
      "CPU time."
    )
  return "\n\n".join(parts)


def boat_long_section() -> str:
  """BOAT at K = 50 ... 800 and with minibatch / Adam lower levels."""
  rows, sources = [], []
  for name in (
    "hypercleaning_peers_long_cpu_cpu.json",
    "hypercleaning_peers_variants_cpu_cpu.json",
  ):
    d = _load(name)
    if d is None:
      continue
    sweeps = d["settings"]["timing"]["repeats"]
    load = d.get("load_average")
    sources.append(
      _source(d, name)
      + f", {sweeps} sweep{'s' if sweeps > 1 else ''}"
      + (f", load average {load['start'][0]:.1f}–{load['end'][0]:.1f}" if load else "")
    )
    peer = {(r["method"], r["size"]): r for r in d["rows"] if r["impl"] != "bilevel_jax"}
    for o in d["rows"]:
      if o["impl"] != "bilevel_jax":
        continue
      p = peer.get((o["method"], o["size"]))
      rows.append(
        [
          o["method"].split(" (")[0] + o["method"].split(")", 1)[1],
          o["size"],
          o["upper_iterations"],
          _ms(o["median_s"]),
          _ms(p and p["median_s"]),
          _x(p and p["median_s"] / o["median_s"]),
          f"{o['metric']:.2f} / {p['metric']:.2f}" if p else f"{o['metric']:.2f} / –",
        ]
      )
  if not rows:
    return ""
  return (
    "**BOAT at long horizons and other lower levels** (the comparison above at K up to 800, "
    "fewer upper iterations at large K, the same on both sides; minibatch SGD with 200 rows "
    "per lower step, the same rows on both sides; Adam as the lower optimizer, RHG only); "
    "time per upper iteration, median, on a shared machine; "
    + "; ".join(sources)
    + ":\n\n"
    + _table(
      [
        "method",
        "K",
        "upper iterations",
        "ours ms",
        "BOAT ms",
        "speedup",
        "test acc % ours / BOAT",
      ],
      rows,
    )
  )


def flop_rate_section() -> str:
  """The measured FLOP rate of the hyper-cleaning hypergradient against the
  matmul rate of the same process (`python -m benchmarks.flop_rate`)."""
  name = "flop_rate_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return ""
  mm = d["matmul"]
  rows = [
    [
      r["method"],
      r["K"],
      _ms(r["median_s"]),
      f"{r['flops'] / 1e9:.1f}",
      f"{r['gflops']:.0f}",
      f"{100 * r['fraction_of_matmul_limit']:.0f}%",
      _ms(r["dot_time_s"]),
      f"{100 * r['fraction_of_program_limit']:.0f}%",
    ]
    for r in d["rows"]
  ]
  shapes = "; ".join(
    f"`{k.split(' (')[0]}` {v:.0f}" for k, v in sorted(mm["program_shape_gflops"].items())
  )
  check = max(abs(c["check_relative_error"]["flops"]) for c in d["costs"].values())
  load = d["load_average"]
  m = d["machine"]
  return (
    "**FLOP rate of the unrolled hypergradient** (hyper-cleaning as in the BOAT comparison: "
    f"{d['problem']['dataset']}, {d['problem']['n_train']} × {d['problem']['features']}, "
    "float32; time per hypergradient, compile apart), FLOPs from XLA's cost analysis "
    "(extrapolated from 4 and 8 unrolled steps; "
    f"{check:.0e} relative to a fully unrolled K = 16), beside a matmul microbenchmark "
    f"run in the same process: best square rate {mm['limit_gflops']:.0f} GFLOP/s "
    f"({mm['limit_shape'].split(' ')[0]}), the program's own GEMM shapes (GFLOP/s) {shapes}. "
    "'GEMM limit' is the time the program's products take at those measured rates. "
    f"`python -m benchmarks.flop_rate` → `benchmarks/results/{name}` ({m['device']}, "
    f"JAX {m['jax']}, commit {m['commit']}; load average {load['start'][0]:.1f} at the "
    f"start, {load['end'][0]:.1f} at the end: a shared machine):\n\n"
    + _table(
      [
        "method",
        "K",
        "ms",
        "GFLOP",
        "GFLOP/s",
        "of square matmul",
        "GEMM limit ms",
        "of GEMM limit",
      ],
      rows,
    )
  )


def vmap_profile_section() -> str:
  """Where the vmapped ridge program's time goes (`python -m benchmarks.flop_rate --vmap`)."""
  name = "vmap_profile_cpu_cpu.json"
  d = _load(name)
  if d is None:
    return ""
  t = {k: v["median_s"] for k, v in d["timings"].items()}
  num = d["problem"].split(" ")[0]
  rows = [
    [
      impl.replace("_", " "),
      _ms(t[f"{impl}_vmap"]),
      _ms(t[f"{impl}_loop"]),
      _x(t[f"{impl}_loop"] / t[f"{impl}_vmap"]),
    ]
    for impl in ("library", "by_hand")
  ]
  ops = [[k, f"{v:.2f}"] for k, v in d["op_in_loop_us"].items()]
  load = d["load_average"]
  m = d["machine"]
  return (
    f"**Profile of the {num} vmapped ridge problems** (`python -m benchmarks.flop_rate --vmap` → "
    f"`benchmarks/results/{name}`, {m['device']}, JAX {m['jax']}, commit {m['commit']}; load "
    f"average {load['start'][0]:.1f}–{load['end'][0]:.1f}: a shared machine). The library "
    "against the same BDA written by hand (one `lax.scan`, no library), each vmapped and as "
    f"a loop of {num} jitted calls; XLA's cost analysis gives "
    f"{d['xla_flops_vmapped'] / 1e6:.0f} MFLOP for the vmapped call "
    f"({d['gflops_vmapped_library']:.1f} GFLOP/s):\n\n"
    + _table(["implementation", "vmapped ms", "loop ms", "loop ÷ vmapped"], rows)
    + "\n\nOne operation of the vmapped program inside a compiled loop (µs per iteration, "
    f"{num} instances of a 20 × 10 matrix unless named):\n\n" + _table(["operation", "µs"], ops)
  )


def render() -> str:
  parts = [
    compile_section(),
    reweighting_section(),
    boat_section(),
    boat_long_section(),
    jaxopt_section(),
    jaxopt_run_section(),
    cvxpy_section(),
    vmap_section(),
    vmap_profile_section(),
    k_section(),
    flop_rate_section(),
    memory_section(),
  ]
  return "\n\n".join(p for p in parts if p)


def headline() -> str:
  """The README's few measured results, each linked to the page with its table."""
  lines = []
  d = _load("hypercleaning_peers_cpu_cpu.json")
  if d is not None:
    ratios = [r["speedup"] for r in d["rows"] if r["impl"] != "bilevel_jax" and r.get("speedup")]
    ks = sorted({r["size"] for r in d["rows"]})
    lines.append(
      f"- Unrolled hypergradients (hyper-cleaning, K = {ks[0]}–{ks[-1]}): "
      f"{_x(min(ratios))}–{_x(max(ratios))} less time per upper iteration than "
      "BOAT (PyTorch) on the same CPU, at the same test accuracy."
    )
  d = _load("reweighting_peers.json")
  if d is not None:
    r = d["ratios"]
    lines.append(
      f"- Reweighting an MLP inside its training loop (Adam lower level on "
      f"minibatches), 784-100-10: {r['cpu:faster_peer']} (the faster of TorchOpt and betty) "
      f"takes {_x(r.get('cpu:' + r['cpu:faster_peer'] + '/ours'))} our CPU time and "
      f"{_x(r.get('wall:' + r['wall:faster_peer'] + '/ours'))} our wall time per upper step; "
      f"the library costs {r['cpu:library/scan']:.2f}× a hand-written `lax.scan` loop."
    )
  d = _load("implicit_peers_cpu_cpu.json")
  if d is not None:
    ratios = [r["speedup"] for r in d["rows"] if r.get("per") == "matched_accuracy"]
    lines.append(
      f"- Implicit hypergradients: {_x(min(ratios))}–{_x(max(ratios))} the speed "
      "of jaxopt at matched hypergradient error (ridge, logistic regression, "
      "benchopt's quadratic)."
    )
  d = _load("composite_peers_cpu_cpu.json")
  if d is not None:
    lines.append(
      f"- Composite lower levels (elastic net): median "
      f"{_x(d['summary'].get('speedup_median'))} faster than the paper's approach "
      "(the same algorithm on cvxpy)."
    )
  for name, label in (
    ("scaling_cpu_cpu.json", "a 2-core CPU"),
    (f"scaling_gpu_{GPU}.json", "an H100"),
  ):
    d = _load(name)
    if d is None:
      continue
    vm = [
      r
      for r in d["rows"]
      if r["size_name"] == "instances" and r["method"].startswith("vmap") and r["size"] == 256
    ]
    if vm:
      lines.append(
        f"- 256 small problems in one `jax.vmap` call: {_x(vm[0]['speedup'])} "
        f"faster than 256 jitted calls on {label}."
      )
  return (
    "\n".join(lines)
    + "\n\nTables, machines and commits: [docs/performance.md](docs/performance.md)."
  )


def _replace_block(path: str, start: str, end: str, body: str) -> None:
  with open(path) as handle:
    text = handle.read()
  if start not in text or end not in text:
    raise SystemExit(f"{path} has no {start} ... {end} block")
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as handle:
    handle.write(f"{head}{start}\n{body}\n{end}{tail}")


def write() -> None:
  """Rewrites the generated blocks of docs/performance.md and README.md."""
  _replace_block(os.path.join(ROOT, "docs", "performance.md"), START, END, render())
  _replace_block(os.path.join(ROOT, "README.md"), HEADLINE_START, HEADLINE_END, headline())


if __name__ == "__main__":
  if "--write" in sys.argv[1:]:
    write()
  else:
    print(render())
