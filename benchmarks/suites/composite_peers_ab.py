"""Before/after of the composite solver: compile and run time of
`composite.make_hypergradient` and `upper.gradient_sampling` on a 10-feature
elastic net, and Algorithm 1 on the first instances of the composite_peers
problem (d = 100) with the count of lower solves, interior-point fallbacks
and iterations, for two source trees (a git revision, extracted to a
temporary folder, and the working tree), each measured in fresh processes,
alternating, ``--rounds`` times.  Machine and load average are recorded.

    python -m benchmarks.suites.composite_peers_ab BASE_REV --out FILE.json

Not a suite of the runner: its sides are whole source trees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import timing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(instances: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  jax.config.update("jax_enable_x64", True)
  from bilevel_jax import composite
  from bilevel_jax._src import gradient_sampling as gs
  from bilevel_jax._src.composite import solver
  from bilevel_jax._src.problems import regression
  from benchmarks import compile_times, timing
  from benchmarks.peers import cvxpy_composite as peer
  from experiments import composite_common as cc
  from experiments import elasticnet

  out: dict = {"bilevel_jax": composite.__file__}

  def measure(name, fn, *args):
    """compile_times.measure (trace, lower, compile, run, jaxpr size, target)
    of fn at args."""
    return compile_times.measure(
      name, lambda dtype: (lambda a: fn(*a), args, None), jnp.float64, repeats=5
    )

  small = regression.make_instances(0, 1, dim=10, n_train=20, n_val=20, n_test=20)
  small = jax.tree_util.tree_map(lambda leaf: leaf[0], small)
  low = regression.elastic_net_lower(small)
  upper = lambda x, y: regression.mse(small.a_val, small.b_val, y)
  x = jnp.zeros(2)
  for method in ("ipm", "warm"):
    fn = composite.make_hypergradient(
      upper, low.g, low.G, low.h, alpha=1e-2, beta=1e-2, method=method, jit=False
    )
    out[f"make_hypergradient_{method}"] = measure("composite.make_hypergradient", fn, x, low.y0)
  fun, state0 = cc.hyper_objective(low, lambda c: regression.mse(small.a_val, small.b_val, c))
  out["gradient_sampling"] = measure(
    "upper.gradient_sampling",
    lambda x, key: (
      gs.gradient_sampling(
        fun, x, key=key, state0=state0, batching="map", num_samples=5, max_steps=1000
      ).x
    ),
    x,
    jax.random.PRNGKey(0),
  )

  data = regression.make_instances(0, instances, dim=100, n_train=100, n_val=100, n_test=300)
  keys = jax.random.split(jax.random.PRNGKey(1), instances)

  def one(d, k):
    res = elasticnet.algorithm1(
      d, k, warm_start=True, batching="map", num_samples=5, max_steps=1000, **peer.GS
    )
    return res.x, res.info.num_steps

  tic = time.perf_counter()
  compiled = (
    jax.jit(one).lower(jax.tree_util.tree_map(lambda leaf: leaf[0], data), keys[0]).compile()
  )
  algo = {"compile_s": time.perf_counter() - tic, "instances": []}
  forward = solver._forward
  log: list = []

  def counted(*args):
    res = forward(*args)
    info = res[3]
    jax.debug.callback(
      lambda *v: log.append([int(np.asarray(a)) for a in v]), info.num_steps, info.interior_steps
    )
    return res

  solver._forward = counted
  counting = jax.jit(lambda d, k: one(d, k))  # a new function: not the cached trace
  for i in range(instances):
    di = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], data)
    times = [timing.time_call(compiled, di, keys[i]) for _ in range(repeats)]
    res = compiled(di, keys[i])
    log.clear()
    jax.block_until_ready(counting(di, keys[i]))
    a = np.asarray(log, dtype=np.int64).reshape(-1, 2)
    algo["instances"].append(
      {
        "instance": i,
        "median_s": statistics.median(times),
        "times_s": times,
        "iterations": int(res[1]),
        "lambda": np.asarray(res[0]).tolist(),
        "solves": len(a),
        "interior_point_solves": int(np.sum(a[:, 1] > 0)),
        "newton_steps": int(np.sum(a[:, 0])),
        "interior_point_steps": int(np.sum(a[:, 1])),
      }
    )
  solver._forward = forward
  out["algorithm1"] = algo
  return out


def write_md(result: dict, path: str) -> None:
  """The before/after table of a result of `main` (medians over rounds)."""
  med = statistics.median
  lines = [
    "# Composite solver before/after",
    "",
    f"Before {result['base'][:7]}, after {result['head'][:7]}; machine "
    f"{result['machine'].get('processor', '')} {result['machine'].get('cpu_affinity')} CPUs "
    f"(shared: load average {result['loadavg_at_start'][0]:.1f} at start, "
    f"{result['loadavg_at_end'][0]:.1f} at end); fresh process per side, alternating, "
    f"{len(result['runs']) // 2} rounds; medians over rounds. Regenerate: "
    "`python -m benchmarks.suites.composite_peers_ab BASE_REV --out FILE.json`.",
    "",
    "| what | side | trace s | lower s | compile s | run ms | jaxpr equations |",
    "|---|---|---|---|---|---|---|",
  ]
  for key in ("make_hypergradient_ipm", "make_hypergradient_warm", "gradient_sampling"):
    for side in ("before", "after"):
      runs = [r[key] for r in result["runs"] if r["side"] == side]
      lines.append(
        f"| {key} | {side} | {med(r['trace_s'] for r in runs):.2f} | "
        f"{med(r['lower_s'] for r in runs):.2f} | {med(r['compile_s'] for r in runs):.2f} | "
        f"{1e3 * med(r['run_s'] for r in runs):.2f} | {runs[0]['jaxpr_equations']} |"
      )
  lines += [
    "",
    "Algorithm 1 on composite_peers instances (d = 100), one jitted call:",
    "",
    "| instance | side | median s | iterations | lower solves | with interior point "
    "| Newton steps | interior-point steps |",
    "|---|---|---|---|---|---|---|---|",
  ]
  count = len(result["runs"][0]["algorithm1"]["instances"])
  for i in range(count):
    for side in ("before", "after"):
      rows = [r["algorithm1"]["instances"][i] for r in result["runs"] if r["side"] == side]
      x = rows[0]
      lines.append(
        f"| {i} | {side} | {med(r['median_s'] for r in rows):.3f} | {x['iterations']} | "
        f"{x['solves']} | {x['interior_point_solves']} | {x['newton_steps']} | "
        f"{x['interior_point_steps']} |"
      )
  compile_s = {
    side: med(r["algorithm1"]["compile_s"] for r in result["runs"] if r["side"] == side)
    for side in ("before", "after")
  }
  lines += [
    "",
    f"Compile of the Algorithm 1 call: {compile_s['before']:.1f} s before, "
    f"{compile_s['after']:.1f} s after.",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.suites.composite_peers_ab")
  parser.add_argument("base", help="git revision of the 'before' side")
  parser.add_argument("--out", required=True)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--instances", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(args.instances, args.repeats)))
    return 0
  git = lambda *a: subprocess.run(
    ["git", *a], cwd=ROOT, check=True, capture_output=True, text=True
  ).stdout.strip()
  result = {
    "machine": timing.machine(),
    "base": git("rev-parse", args.base),
    "head": git("rev-parse", "HEAD"),
    "head_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "loadavg_at_start": list(os.getloadavg()),
    "runs": [],
  }
  with tempfile.TemporaryDirectory() as tmp:
    archive = subprocess.run(
      ["git", "archive", args.base], cwd=ROOT, check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
    for r in range(args.rounds):
      for side, path in (("before", tmp), ("after", ROOT)):
        env = dict(os.environ, PYTHONPATH=path)
        load = list(os.getloadavg())
        # The worker is this file, run as a script: the imports resolve to the side's tree.
        proc = subprocess.run(
          [
            sys.executable,
            os.path.abspath(__file__),
            "x",
            "--out",
            "-",
            "--worker",
            "--instances",
            str(args.instances),
            "--repeats",
            str(args.repeats),
          ],
          cwd=path,
          env=env,
          check=True,
          capture_output=True,
          text=True,
        )
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run.update(side=side, round=r, loadavg_before=load, loadavg_after=list(os.getloadavg()))
        result["runs"].append(run)
        print(
          side,
          r,
          {k: v.get("compile_s") for k, v in run.items() if isinstance(v, dict)},
          [x["median_s"] for x in run["algorithm1"]["instances"]],
          flush=True,
        )
  result["loadavg_at_end"] = list(os.getloadavg())
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  write_md(result, os.path.splitext(args.out)[0] + ".md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
