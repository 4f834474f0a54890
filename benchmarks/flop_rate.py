"""Measured FLOP rate of the unrolled hypergradients against this machine's matmul rate.

    python -m benchmarks.flop_rate [--K 50 100 200 400 800] [--repeats 5]
    python -m benchmarks.flop_rate --vmap      # the vmapped-ridge profile instead

In one process:

1. **Matmul microbenchmark** (float32, ``jax.jit`` of one ``lax.dot_general``):
   square n x n @ n x n for n in 256 ... 2048, and every distinct GEMM shape
   of the hyper-cleaning program (read from its optimized HLO). A sample is
   a run of back-to-back calls lasting at least ``--sample-s``; the rate of a
   shape is the median over samples ("sustained"), and *the machine's
   measured limit* is the best sustained square rate. The microbenchmark runs
   before and after the hypergradients; both are recorded and the limit is
   taken over both.
2. **Hypergradients**: BDA and RHG on the hyper-cleaning problem of
   ``configs/bench/hypercleaning_peers.toml`` (mnist5k, 2000 training rows,
   784 features, 10 classes, float32; BOAT's formulation, `hypercleaning_peers.
   matched_hypergradient`) at each K: time per hypergradient (the looped
   program, median of alternated repeats after a warm-up call; compile apart),
   FLOPs and bytes from XLA's cost analysis (XLA counts a loop body once, so
   the cost of K steps is extrapolated from 4 and 8 fully unrolled steps,
   `scaling.unrolled_cost`, and checked against a fully unrolled K = 16),
   achieved GFLOP/s = FLOPs / time, and its fraction of the measured limit.
3. **The roofline of this program on this CPU**: the GEMMs of the K-step
   program (their count per shape extrapolated like the FLOPs) at the rates
   the microbenchmark measured for those shapes give ``dot_time_s``, the time
   the program's matrix products alone take; the remaining FLOPs are
   elementwise (softmax, sigmoid, the optimizer). ``program_limit_s =
   dot_time_s`` (the products cannot be faster than in isolation) and
   ``fraction_of_program_limit = program_limit_s / time``. Each product here
   is thin (one side has 10 columns, the classes), so it streams the whole
   2000 x 784 training matrix (6.3 MB, in the L3 cache) for 20 FLOPs per
   4 bytes read: the rate at which one ``jnp.sum`` reads that matrix
   (``training_matrix_read_Bps``) bounds those products at 5 FLOP/byte times
   it. XLA's bytes accessed over that read rate and over a 256 MiB copy's
   bandwidth give ``memory_time_cached_s`` and ``memory_time_s``. The
   program's shapes widened 2x and 4x on the thin side are timed too: what
   stacking products that share the wide operand would run at.

With ``--vmap``: the 256 vmapped ridge problems of the scaling suite against
a loop of 256 jitted calls, the same vmapped against a hand-written vmapped
ridge BDA loop without the library, and the HLO of the vmapped program (its
dots: batched tiny GEMMs; its while loop). Writes
``benchmarks/results/vmap_profile_<device>.json``.

The machine is shared: the load average at the start and the end is recorded.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import roofline, runner, timing
from experiments import report

CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "configs",
  "bench",
  "hypercleaning_peers.toml",
)
SQUARE = (256, 512, 1024, 2048)
TARGET_FRACTION = 0.7

_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_DOT = re.compile(
  r"\bdot\((?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+),\s*(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)\)"
)


def _dims(text: str, key: str) -> tuple[int, ...]:
  match = re.search(key + r"=\{([\d,]*)\}", text)
  return tuple(int(v) for v in match.group(1).split(",") if v) if match else ()


def hlo_dots(hlo_text: str) -> list[dict]:
  """The dot instructions of an optimized HLO module, with their shapes.

  Each is ``{"lhs": shape, "rhs": shape, "dims": ((lc, rc), (lb, rb)),
  "out": shape, "flops": 2 * prod(out) * prod(contracted)}``. Operand shapes
  are looked up by name among the module's definitions (names are unique in
  an HLO module).
  """
  shapes = {}
  for line in hlo_text.splitlines():
    match = _DEF.match(line)
    if match:
      shapes[match.group(1)] = tuple(int(v) for v in match.group(3).split(",") if v)
  dots = []
  for line in hlo_text.splitlines():
    match = _DOT.search(line)
    if not match or "=" not in line:
      continue
    lhs, rhs = shapes.get(match.group(1)), shapes.get(match.group(2))
    out = _DEF.match(line)
    if lhs is None or rhs is None or out is None:
      continue
    out_shape = tuple(int(v) for v in out.group(3).split(",") if v)
    lc, rc = _dims(line, "lhs_contracting_dims"), _dims(line, "rhs_contracting_dims")
    lb, rb = _dims(line, "lhs_batch_dims"), _dims(line, "rhs_batch_dims")
    contracted = int(np.prod([lhs[i] for i in lc])) if lc else 1
    dots.append(
      {
        "lhs": lhs,
        "rhs": rhs,
        "dims": ((lc, rc), (lb, rb)),
        "out": out_shape,
        "flops": 2 * int(np.prod(out_shape)) * contracted,
      }
    )
  return dots


def shape_key(dot: dict) -> str:
  """``"2000x784 . 10x784 -> 2000x10 (c 1,1)"``: one GEMM shape."""
  (lc, rc), (lb, rb) = dot["dims"]
  fmt = lambda s: "x".join(map(str, s))
  batch = f" b {','.join(map(str, lb))};{','.join(map(str, rb))}" if lb else ""
  return (
    f"{fmt(dot['lhs'])} . {fmt(dot['rhs'])} -> {fmt(dot['out'])} "
    f"(c {','.join(map(str, lc))};{','.join(map(str, rc))}{batch})"
  )


def dot_counts(hlo_text: str) -> dict[str, dict]:
  """GEMM shape -> {"count", "flops" (each), "dot"} of one HLO module."""
  out: dict[str, dict] = {}
  for dot in hlo_dots(hlo_text):
    entry = out.setdefault(shape_key(dot), {"count": 0, "flops": dot["flops"], "dot": dot})
    entry["count"] += 1
  return out


def time_samples(fn, args, *, samples: int, sample_s: float) -> list[float]:
  """Seconds per call: ``samples`` runs of back-to-back calls, each at least
  ``sample_s`` long (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  tic = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = max(time.perf_counter() - tic, 1e-7)
  calls = max(1, int(sample_s / once))
  out = []
  for _ in range(samples):
    tic = time.perf_counter()
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)
    out.append((time.perf_counter() - tic) / calls)
  return out


def gemm_rate(dot: dict, *, samples: int, sample_s: float, seed: int = 0) -> dict:
  """Sustained and best GFLOP/s of one float32 dot_general shape (jitted)."""
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal(dot["lhs"]), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal(dot["rhs"]), jnp.float32)
  fn = jax.jit(lambda a, b: lax.dot_general(a, b, dot["dims"])).lower(lhs, rhs).compile()
  seconds = time_samples(fn, (lhs, rhs), samples=samples, sample_s=sample_s)
  med, best = statistics.median(seconds), min(seconds)
  return {
    "shape": shape_key(dot),
    "flops": dot["flops"],
    "median_s": med,
    "best_s": best,
    "gflops": dot["flops"] / med / 1e9,
    "gflops_best": dot["flops"] / best / 1e9,
  }


def square_dot(n: int) -> dict:
  return {
    "lhs": (n, n),
    "rhs": (n, n),
    "dims": (((1,), (0,)), ((), ())),
    "out": (n, n),
    "flops": 2 * n**3,
  }


def widened(dot: dict, factor: int) -> dict:
  """The same GEMM with ``factor`` times the columns of its thin side (the
  dimension of size 10 here): what stacking ``factor`` products that share
  the wide operand into one would run as."""
  thin = min(d for d in dot["out"])
  out = tuple(d * factor if d == thin else d for d in dot["out"])
  lhs = tuple(d * factor if d == thin else d for d in dot["lhs"])
  rhs = tuple(d * factor if d == thin else d for d in dot["rhs"])
  return {**dot, "lhs": lhs, "rhs": rhs, "out": out, "flops": dot["flops"] * factor}


def matmul_phase(program_dots: dict, *, samples: int, sample_s: float) -> dict:
  """The square sizes, the program's GEMM shapes and those shapes widened
  2x and 4x on the thin side, each timed once."""
  rate = functools.partial(gemm_rate, samples=samples, sample_s=sample_s)
  return {
    "square": [rate(square_dot(n)) for n in SQUARE],
    "program_shapes": {key: rate(entry["dot"]) for key, entry in program_dots.items()},
    "widened_shapes": {
      f"{key} x{f}": rate(widened(entry["dot"], f))
      for key, entry in program_dots.items()
      for f in (2, 4)
    },
  }


def read_bandwidth(array, samples: int, sample_s: float) -> float:
  """Bytes/s of ``jnp.sum(array)`` (one read of it): the rate a GEMM that
  streams ``array`` once can read it at, from whichever cache level holds it."""
  fn = jax.jit(jnp.sum).lower(array).compile()
  seconds = time_samples(fn, (array,), samples=samples, sample_s=sample_s)
  return array.size * array.dtype.itemsize / statistics.median(seconds)


def hypercleaning(config_path: str = CONFIG):
  """(problem, x, y0, cfg) of the BOAT comparison (float32)."""
  from benchmarks.suites import hypercleaning_peers as hp
  from bilevel_jax._src.problems import hypercleaning as hc

  _, _, cfg = runner.read_config(config_path)
  dataset, split = hp.load_split(cfg)
  classes = int(max(split.y_train.max(), split.y_val.max(), split.y_test.max())) + 1
  y0 = hp.initial_lower(
    split.x_train.shape[1], classes, cfg["data"]["init_std"], cfg["data"]["seed"]
  )
  problem = hc.HyperCleaning(jax.tree_util.tree_map(jnp.asarray, split), l2=0.0)
  y0 = jax.tree_util.tree_map(jnp.asarray, y0)
  return dataset, problem, problem.init_weights(), y0, cfg


def make_hypergradient(problem, cfg, method: str, K: int, unroll=1):
  """``(x, y0) -> (F(y_K), grad)``: `hypercleaning_peers.matched_hypergradient`."""
  from benchmarks.suites import hypercleaning_peers as hp

  m = cfg["method"]
  fn = hp.matched_hypergradient(
    problem,
    method,
    K,
    lower_lr=m["lower_lr"],
    alpha_init=m["alpha_init"],
    alpha_decay=m["alpha_decay"],
    unroll=unroll,
  )
  return lambda x, y0: fn(x, y0)[:2]


def program_cost(problem, cfg, method: str, x, y0, probes=(4, 8), check_k: int = 16) -> dict:
  """Per-step and fixed FLOPs, bytes and GEMM counts of the unrolled program
  (from ``probes`` unrolled steps), and the extrapolation checked at
  ``check_k`` fully unrolled steps."""
  a, b = probes
  out = {}
  for k in (a, b, check_k):
    compiled, seconds = timing.compile_timed(
      make_hypergradient(problem, cfg, method, k, unroll=True), x, y0
    )
    out[k] = {
      **roofline.cost(compiled),
      "dots": dot_counts(compiled.as_text()),
      "compile_s": seconds,
    }
  per_step = {key: (out[b][key] - out[a][key]) / (b - a) for key in ("flops", "bytes")}
  fixed = {key: out[b][key] - b * per_step[key] for key in ("flops", "bytes")}
  dots_step, dots_fixed = {}, {}
  for key in set(out[a]["dots"]) | set(out[b]["dots"]):
    ca = out[a]["dots"].get(key, {}).get("count", 0)
    cb = out[b]["dots"].get(key, {}).get("count", 0)
    dots_step[key] = (cb - ca) / (b - a)
    dots_fixed[key] = cb - b * dots_step[key]
  entries = {**out[a]["dots"], **out[b]["dots"]}
  check = {
    key: (fixed[key] + check_k * per_step[key]) / out[check_k][key] - 1
    for key in ("flops", "bytes")
  }
  dot_check = {
    key: dots_fixed.get(key, 0) + check_k * dots_step.get(key, 0)
    for key in set(dots_step) | set(out[check_k]["dots"])
  }
  check["dots_max_count_error"] = max(
    abs(dot_check[key] - out[check_k]["dots"].get(key, {}).get("count", 0)) for key in dot_check
  )
  return {
    "per_step": per_step,
    "fixed": fixed,
    "dots_per_step": dots_step,
    "dots_fixed": dots_fixed,
    "dot_entries": entries,
    "probes": list(probes),
    "check_k": check_k,
    "check_relative_error": check,
    "unrolled_compile_s": {str(k): out[k]["compile_s"] for k in out},
  }


def _load() -> list[float]:
  return list(os.getloadavg())


def run_hypergradients(args) -> dict:
  load_start = _load()
  dataset, problem, x, y0, cfg = hypercleaning()
  costs = {m: program_cost(problem, cfg, m, x, y0) for m in args.methods}
  program_dots = {}
  for c in costs.values():
    program_dots.update(c["dot_entries"])
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  log(f"[flop_rate] GEMM shapes of the program: {sorted(program_dots)}")
  before = matmul_phase(program_dots, samples=args.samples, sample_s=args.sample_s)
  log(
    "[flop_rate] square matmul GFLOP/s: "
    + ", ".join(f"{r['shape'].split(' ')[0]} {r['gflops']:.0f}" for r in before["square"])
  )
  bandwidth = roofline.measured_bandwidth(num_bytes=1 << 28, repeats=10)
  train_read = read_bandwidth(problem.data.x_train, args.samples, args.sample_s)
  log(
    f"[flop_rate] copy bandwidth (256 MiB) {bandwidth / 1e9:.1f} GB/s, read of the "
    f"training matrix {train_read / 1e9:.1f} GB/s"
  )
  rows = []
  for K in args.K:
    calls, compile_s = {}, {}
    for method in args.methods:
      compiled, seconds = timing.compile_timed(make_hypergradient(problem, cfg, method, K), x, y0)
      calls[method] = functools.partial(compiled, x, y0)
      compile_s[method] = seconds
    samples = timing.time_alternating(calls, args.repeats, warmup=1)
    for method in args.methods:
      stats = timing.summarize(samples[method])
      c = costs[method]
      flops = c["fixed"]["flops"] + K * c["per_step"]["flops"]
      nbytes = c["fixed"]["bytes"] + K * c["per_step"]["bytes"]
      counts = {
        key: c["dots_fixed"].get(key, 0) + K * c["dots_per_step"].get(key, 0)
        for key in c["dots_per_step"]
      }
      rows.append(
        {
          "method": method,
          "K": K,
          "compile_s": compile_s[method],
          **stats,
          "samples_s": samples[method],
          "flops": flops,
          "bytes": nbytes,
          "gemm_counts": counts,
          "gemm_flops": sum(counts[k] * program_dots[k]["flops"] for k in counts),
        }
      )
      log(
        f"[flop_rate] {method} K={K}: {1e3 * stats['median_s']:.1f} ms, "
        f"{flops / stats['median_s'] / 1e9:.1f} GFLOP/s (XLA FLOPs)"
      )
  after = matmul_phase(program_dots, samples=args.samples, sample_s=args.sample_s)
  load_end = _load()
  square = {r["shape"]: r for r in before["square"]}
  square_after = {r["shape"]: r for r in after["square"]}
  limit = max(max(r["gflops"] for r in before["square"]), max(r["gflops"] for r in after["square"]))
  limit_shape = max(list(square.values()) + list(square_after.values()), key=lambda r: r["gflops"])[
    "shape"
  ]
  shape_rate = {
    key: max(before["program_shapes"][key]["gflops"], after["program_shapes"][key]["gflops"])
    for key in program_dots
  }
  for row in rows:
    seconds = row["median_s"]
    row["gflops"] = row["flops"] / seconds / 1e9
    row["fraction_of_matmul_limit"] = row["gflops"] / limit
    row["gemm_flop_share"] = row["gemm_flops"] / row["flops"]
    row["dot_time_s"] = sum(
      n * program_dots[k]["flops"] / (shape_rate[k] * 1e9) for k, n in row["gemm_counts"].items()
    )
    row["memory_time_s"] = row["bytes"] / bandwidth
    row["memory_time_cached_s"] = row["bytes"] / train_read
    row["program_limit_s"] = row["dot_time_s"]
    row["program_limit_gflops"] = row["flops"] / row["dot_time_s"] / 1e9
    row["fraction_of_program_limit"] = row["dot_time_s"] / seconds
    row["meets_target"] = row["fraction_of_matmul_limit"] >= TARGET_FRACTION
  return {
    "benchmark": "flop_rate",
    "command": "python -m benchmarks.flop_rate " + " ".join(sys.argv[1:]),
    "machine": timing.machine(),
    "load_average": {"start": load_start, "end": load_end},
    "problem": {
      "dataset": dataset,
      "n_train": int(problem.data.x_train.shape[0]),
      "n_val": int(problem.data.x_val.shape[0]),
      "features": int(problem.data.x_train.shape[1]),
      "dtype": "float32",
      "config": os.path.relpath(CONFIG),
      "formulation": "hypercleaning_peers.matched_hypergradient (BOAT's: lr 0.01 both "
      "directions, geometric alpha 0.5 * 0.9^(k-1) for BDA, 0 for RHG)",
    },
    "target_fraction": TARGET_FRACTION,
    "matmul": {
      "limit_gflops": limit,
      "limit_shape": limit_shape,
      "definition": "best over square sizes of the median rate of samples lasting "
      f">= {args.sample_s} s ({args.samples} samples), over the runs before and after",
      "before": before,
      "after": after,
      "program_shape_gflops": shape_rate,
    },
    "copy_bandwidth_Bps": bandwidth,
    "training_matrix_read_Bps": train_read,
    "training_matrix_bytes": int(problem.data.x_train.size * problem.data.x_train.dtype.itemsize),
    "costs": {m: {k: v for k, v in c.items() if k != "dot_entries"} for m, c in costs.items()},
    "gemm_shapes": {k: {"flops": v["flops"]} for k, v in program_dots.items()},
    "rows": rows,
  }


def ridge_by_hand(x, d, *, steps: int):
  """`scaling.ridge_hypergradient` written out without the library: the same
  BDA iteration (harmonic alpha_k = 0.5 / k, s = 1 / L, y_0 = 0) in one
  `lax.scan`, and reverse mode through it. Returns (F(y_K), grad)."""
  a, b, a_val, b_val = d["a"], d["b"], d["a_val"], d["b_val"]
  s = 1.0 / (jnp.sum(a**2) / a.shape[0] + jnp.max(jnp.exp(x)))

  def upper(y):
    return 0.5 * jnp.mean((a_val @ y - b_val) ** 2)

  def lower(xx, y):
    return 0.5 * jnp.mean((a @ y - b) ** 2) + 0.5 * jnp.sum(jnp.exp(xx) * y**2)

  def phi(xx):
    def step(y, k):
      alpha = 0.5 / k
      g_upper, g_lower = jax.grad(upper)(y), jax.grad(lower, 1)(xx, y)
      return y - (alpha * s * g_upper + (1 - alpha) * s * g_lower), None

    ks = jnp.arange(1, steps + 1, dtype=x.dtype)
    y, _ = lax.scan(step, jnp.zeros_like(xx), ks)
    return upper(y)

  return jax.value_and_grad(phi)(x)


def loop_op_us(body, args, iterations: int = 2000, repeats: int = 5) -> float:
  """Microseconds per iteration of ``lax.fori_loop`` over ``body(args, carry)``
  (the carry is ``args[-1]``): the cost of one op inside a compiled loop,
  without dispatch."""
  *consts, carry = args
  fn = jax.jit(lambda *a: lax.fori_loop(0, iterations, lambda i, c: body(*a[:-1], c), a[-1]))
  compiled = fn.lower(*consts, carry).compile()
  seconds = time_samples(compiled, (*consts, carry), samples=repeats, sample_s=0.0)
  return 1e6 * statistics.median(seconds) / iterations


def while_loops(hlo_text: str) -> int:
  return sum(1 for line in hlo_text.splitlines() if re.search(r"=\s*\(.*\bwhile\(", line))


def run_vmap_profile(args) -> dict:
  """The 256 vmapped ridge problems against a loop, our code against the
  same BDA by hand, and where the vmapped program spends its time."""
  from benchmarks.suites import scaling

  load_start = _load()
  num, dim, samples, K = args.instances, 10, 20, 50
  xs, dat = scaling.ridge_instances(num, dim, samples, jnp.float32)
  per = [(xs[i], jax.tree_util.tree_map(lambda v: v[i], dat)) for i in range(num)]
  fns = {
    "library": functools.partial(scaling.ridge_hypergradient, steps=K),
    "by_hand": functools.partial(ridge_by_hand, steps=K),
  }
  compiled, hlo = {}, {}
  for name, fn in fns.items():
    compiled[name + "_vmap"], _ = timing.compile_timed(jax.vmap(fn), xs, dat)
    compiled[name + "_single"], _ = timing.compile_timed(fn, *per[0])
    hlo[name] = compiled[name + "_vmap"].as_text()
  calls = {}
  for name in fns:
    v, one = compiled[name + "_vmap"], compiled[name + "_single"]
    calls[name + "_vmap"] = functools.partial(v, xs, dat)
    calls[name + "_loop"] = lambda one=one: [one(x, d) for x, d in per]
    calls[name + "_single_call"] = functools.partial(one, *per[0])
  grads = {n: np.asarray(calls[n + "_vmap"]()[1]) for n in fns}
  times = timing.time_alternating(calls, args.repeats, warmup=1)
  stats = {k: timing.summarize(v) for k, v in times.items()}
  med = {k: v["median_s"] for k, v in stats.items()}
  # XLA's FLOPs of the vmapped library program, K extrapolated from 4 and 8 unrolled steps.
  unrolled = {}
  for k in (4, 8):
    c, _ = timing.compile_timed(
      jax.vmap(functools.partial(scaling.ridge_hypergradient, steps=k, unroll=True)), xs, dat
    )
    unrolled[k] = roofline.cost(c)
  flops = unrolled[8]["flops"] + (K - 8) * (unrolled[8]["flops"] - unrolled[4]["flops"]) / 4
  # One op of the vmapped program inside a compiled loop.
  rng = np.random.default_rng(0)
  A = jnp.asarray(rng.standard_normal((num, samples, dim)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((num, dim)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((num, samples)), jnp.float32)
  At, yt = jnp.transpose(A, (1, 2, 0)), y.T
  ops = {
    "loop_only (y * 0.999)": loop_op_us(lambda A, c: c * 0.999, (A, y)),
    "batched matvec A y (dot_general, batch dim first)": loop_op_us(
      lambda A, c: c + 1e-3 * jnp.einsum("bij,bj->bi", A, c)[:, :dim], (A, y)
    ),
    "batched A^T (A y - r) (two dot_generals)": loop_op_us(
      lambda A, r, c: c + 1e-3 * jnp.einsum("bij,bi->bj", A, jnp.einsum("bij,bj->bi", A, c) - r),
      (A, r, y),
    ),
    "A y as multiply + reduce (batch first)": loop_op_us(
      lambda A, c: c + 1e-3 * jnp.sum(A * c[:, None, :], -1)[:, :dim], (A, y)
    ),
    "A y as multiply + reduce (batch minor)": loop_op_us(
      lambda A, c: c + 1e-3 * jnp.sum(A * c[None, :, :], 1)[:dim], (At, yt)
    ),
    "one matvec A_b y_b (single instance)": loop_op_us(
      lambda A, c: c + 1e-3 * (A @ c)[:dim], (A[0], y[0])
    ),
  }
  dots = hlo_dots(hlo["library"])
  load_end = _load()
  ratio = {
    "library loop / library vmap": med["library_loop"] / med["library_vmap"],
    "by_hand loop / by_hand vmap": med["by_hand_loop"] / med["by_hand_vmap"],
    "library vmap / by_hand vmap": med["library_vmap"] / med["by_hand_vmap"],
    "library single call / by_hand single call": med["library_single_call"]
    / med["by_hand_single_call"],
    "library loop / (num x library single call)": med["library_loop"]
    / (num * med["library_single_call"]),
  }
  return {
    "benchmark": "vmap_profile",
    "command": "python -m benchmarks.flop_rate " + " ".join(sys.argv[1:]),
    "machine": timing.machine(),
    "load_average": {"start": load_start, "end": load_end},
    "problem": f"{num} ridge problems (scaling.ridge_instances: dim {dim}, {samples} samples), "
    f"BDA K = {K}, float32",
    "max_abs_grad_library_vs_by_hand": float(np.max(np.abs(grads["library"] - grads["by_hand"]))),
    "timings": stats,
    "ratios": ratio,
    "xla_flops_vmapped": flops,
    "gflops_vmapped_library": flops / med["library_vmap"] / 1e9,
    "op_in_loop_us": ops,
    "hlo": {
      name: {
        "while_loops": while_loops(text),
        "instructions": sum(1 for line in text.splitlines() if " = " in line),
        "dots": collections.Counter(shape_key(d) for d in hlo_dots(text)),
      }
      for name, text in hlo.items()
    },
    "dot_count_vmapped_library": len(dots),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.flop_rate", description=__doc__)
  parser.add_argument("--K", type=int, nargs="+", default=[50, 100, 200, 400, 800])
  parser.add_argument("--methods", nargs="+", default=["bda", "rhg"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--samples", type=int, default=7, help="matmul samples per shape")
  parser.add_argument("--sample-s", type=float, default=0.1, help="seconds per matmul sample")
  parser.add_argument("--vmap", action="store_true", help="the vmapped-ridge profile instead")
  parser.add_argument("--instances", type=int, default=256, help="vmapped ridge problems")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = parser.parse_args(argv)
  if args.vmap:
    payload = run_vmap_profile(args)
    path = args.out or timing.results_path("vmap_profile")
  else:
    payload = run_hypergradients(args)
    path = args.out or timing.results_path("flop_rate")
  report.write_json(path, payload)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
