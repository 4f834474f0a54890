"""Data hyper-cleaning (BDA paper, Section 5.2, Table 2): RHG, truncated RHG
and BDA learn per-sample weights sigma(x_i) on a training set with half of
its labels corrupted."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from experiments import config
from bilevel_jax._src import datasets
from bilevel_jax._src import status as status_lib
from bilevel_jax._src import unrolled
from experiments import common
from bilevel_jax._src.problems import hypercleaning as hc

F = config.Field
METHODS = ("rhg", "trhg", "bda")
SCHEMA = {
  "data": {
    "dataset": F("str", "digits", config.one_of(*datasets.DATASETS)),
    "path": F("str", "", doc="local MNIST file or folder (dataset = 'mnist')"),
    "n_train": F("int", 1000, config.positive),
    "n_val": F("int", 50, config.positive),
    "n_test": F("int", 0, doc="0: every remaining sample"),
    "corruption": F("float", 0.5, config.unit_interval),
    "seed": F("int", 0, doc="first seed: split, corruption and initialization"),
    "num_seeds": F(
      "int", 1, config.positive, "runs with seeds seed, seed + 1, ...; mean +- standard error"
    ),
    "pca_dims": F(
      "int",
      0,
      lambda v: None if v >= 0 else "must be >= 0",
      "0: raw features; d > 0: project every split onto the top d principal "
      "components of the (centred) training inputs of that seed's split",
    ),
  },
  "model": {
    "l2": F("float", 1e-4, lambda v: None if v >= 0 else "must be >= 0"),
    "init_scale": F(
      "float",
      0.0,
      lambda v: None if v >= 0 else "must be >= 0",
      "standard deviation of the Gaussian initial W drawn from the seed (0: zeros)",
    ),
  },
  "lower": {
    "K": F("list[int]", [50, 100], config.positive),
    "methods": F("list[str]", list(METHODS), config.one_of(*METHODS)),
    "truncate": F("int", 25, config.positive),
    "alpha": F("alpha", "0.5/k"),
    "lower_lr_scale": F(
      "float",
      4.0,
      config.positive,
      "s_l = scale / L, L the bound of HyperCleaning.lower_smoothness",
    ),
    "upper_lr_scale": F("float", 4.0, config.positive, "s_u = scale / L"),
    "checkpoint": F("str", "none", config.one_of("none", "step", "sqrt")),
  },
  "upper": common.upper_schema(optimizer="adam", learning_rate=1.0, steps=200),
  "baselines": {
    "enabled": F("bool", True),
    "steps": F("int", 3000, config.positive),
  },
}

# Table 2 of the paper (test accuracy, %, full MNIST 7000/7000/56000).
PAPER_TABLE2 = {
  "RHG": {50: 88.96, 100: 89.73, 200: 90.13, 400: 90.19, 800: 90.15},
  "T-RHG": {50: 87.90, 100: 88.28, 200: 88.50, 400: 88.52, 800: 89.99},
  "BDA": {50: 89.12, 100: 90.12, 200: 90.57, 400: 90.81, 800: 90.86},
}


def pca_project(split, dims: int):
  """Projects every split onto the top ``dims`` principal components of the
  centred training inputs (a fixed linear map fitted on training inputs
  only: no validation, test or label information)."""
  x = np.asarray(split.x_train, np.float64)
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  basis = vt[:dims].T
  project = lambda v: ((np.asarray(v, np.float64) - mean) @ basis).astype(np.asarray(v).dtype)
  return split._replace(
    x_train=project(split.x_train), x_val=project(split.x_val), x_test=project(split.x_test)
  )


def load_problem(cfg: dict, seed: int | None = None) -> hc.HyperCleaning:
  d = cfg["data"]
  features, labels = datasets.load(d["dataset"], d["path"] or None)
  split = datasets.hypercleaning_split(
    features,
    labels,
    n_train=d["n_train"],
    n_val=d["n_val"],
    n_test=d["n_test"] or None,
    corruption=d["corruption"],
    seed=d["seed"] if seed is None else seed,
  )
  if d.get("pca_dims", 0):
    split = pca_project(split, d["pca_dims"])
  return hc.HyperCleaning(jax.tree_util.tree_map(jnp.asarray, split), l2=cfg["model"]["l2"])


def init_params(problem: hc.HyperCleaning, num_classes: int, scale: float, seed: int):
  """Zero model, or W ~ N(0, scale^2) drawn from ``seed`` (b = 0)."""
  params = problem.init_params(num_classes)
  if scale > 0:
    w = params["W"]
    noise = jax.random.normal(jax.random.PRNGKey(seed), w.shape, w.dtype)
    params = {**params, "W": scale * noise}
  return params


def method_settings(method: str, cfg: dict) -> dict:
  low = cfg["lower"]
  if method == "rhg":
    return {"alpha": 0.0}
  if method == "trhg":
    return {"alpha": 0.0, "truncate": low["truncate"]}
  return {"alpha": common.make_alpha(low["alpha"])}


def _train_lower(problem: hc.HyperCleaning, steps: int, lower_lr: float, params0):
  """Minimizes the lower objective at uniform weights (x = 0) by gradient descent."""
  return unrolled.solve(
    problem.upper,
    problem.lower,
    problem.init_weights(),
    params0,
    steps=steps,
    upper_lr=1.0,
    lower_lr=lower_lr,
    alpha=0.0,
  ).y


BASELINES = {
  "validation_only": "validation set only",
  "uniform": "all training data, uniform weights",
  "clean_oracle": "clean training samples only (oracle)",
}


def baselines(problem: hc.HyperCleaning, cfg: dict, params0) -> dict[str, float]:
  """Test accuracy (%) without bilevel cleaning: validation set only, all
  (noisy) training data, and the clean training samples only (an oracle)."""
  data = problem.data
  steps = cfg["baselines"]["steps"]
  scale = cfg["lower"]["lower_lr_scale"]
  keep = ~np.asarray(data.corrupted)
  variants = {
    "validation_only": data._replace(x_train=data.x_val, y_train=data.y_val),
    "uniform": data,
    "clean_oracle": data._replace(x_train=data.x_train[keep], y_train=data.y_train[keep]),
  }
  out = {}
  for key, variant in variants.items():
    prob = problem._replace(data=variant)
    params = _train_lower(prob, steps, scale / prob.lower_smoothness(), params0)
    out[key] = 100 * float(hc.accuracy(params, data.x_test, data.y_test))
  return out


def mean_se(values) -> dict:
  """Mean, standard error and n from `common.spread`; one seed's standard
  error is reported as 0 (no spread measured) for the tables."""
  s = common.spread(values)
  return {"mean": s["mean"], "se": s["se"] if s["n"] > 1 else 0.0, "n": s["n"]}


def excludes_zero(stats: dict, level: float = 0.95) -> bool:
  """Whether the Student-t interval mean +- t_{n-1} se at ``level`` excludes 0."""
  from scipy import stats as scipy_stats

  if stats["n"] < 2:
    return False
  t = float(scipy_stats.t.ppf(0.5 + level / 2, stats["n"] - 1))
  return abs(stats["mean"]) > t * stats["se"]


def _pm(stats: dict) -> str:
  return f"{stats['mean']:.2f} ± {stats['se']:.2f}"


NAMES = {"rhg": "RHG", "trhg": "T-RHG", "bda": "BDA"}


def _stack(trees):
  return jax.tree_util.tree_map(lambda *v: jnp.stack(v), *trees)


def make_trainer(cfg: dict, K: int, method: str, l2: float):
  """``train(data, params0, s_l, s_u) -> (x, history, status)``: the
  upper loop (``upper.steps`` Optax steps on x from x = 0, each with a
  K-step unrolled hypergradient at y_0 = params0) as one program, so that
  it can be vmapped over seeds (data split, corruption and initial W).
  history holds, per upper step, phi_K(x_t) and the test accuracy and F1
  at (x_t, y_K(x_t)). status: the worst lower-solve status over the run."""
  low, up = cfg["lower"], cfg["upper"]
  settings = method_settings(method, cfg)
  if settings.get("truncate", 0) > K:
    settings["truncate"] = K
  checkpoint = {"none": False, "step": True, "sqrt": "sqrt"}[low["checkpoint"]]
  optimizer = common.make_optimizer(up["optimizer"], up["learning_rate"])

  def train(data, params0, s_l, s_u):
    problem = hc.HyperCleaning(data, l2=l2)
    x0 = problem.init_weights()

    def body(carry, _):
      x, state, status = carry
      value, grad, sol = unrolled.hypergradient(
        problem.upper,
        problem.lower,
        x,
        params0,
        steps=K,
        upper_lr=s_u,
        lower_lr=s_l,
        checkpoint=checkpoint,
        return_info=True,
        **settings,
      )
      out = {
        "value": value,
        "test_acc": hc.accuracy(sol.y, data.x_test, data.y_test),
        "f1": hc.detection_f1(x, data.corrupted),
      }
      updates, state = optimizer.update(grad, state, x)
      x = optax.apply_updates(x, updates)
      return (x, state, jnp.maximum(status, sol.info.status)), out

    status0 = jnp.asarray(status_lib.SUCCESS, jnp.int32)
    (x, _, status), history = lax.scan(
      body, (x0, optimizer.init(x0), status0), None, length=up["steps"]
    )
    return x, history, status

  return jax.jit(jax.vmap(train))


def prepare_seed(cfg: dict, seed: int) -> dict:
  """One seed's problem, initial W, step sizes and step-size regime."""
  problem = load_problem(cfg, seed)
  data = problem.data
  num_classes = int(max(np.max(data.y_train), np.max(data.y_val), np.max(data.y_test)) + 1)
  low = cfg["lower"]
  lipschitz = problem.lower_smoothness()
  s_l, s_u = low["lower_lr_scale"] / lipschitz, low["upper_lr_scale"] / lipschitz
  params0 = init_params(problem, num_classes, cfg["model"]["init_scale"], seed)
  # The step-size regime, as the solver reports it for L_f <= lipschitz.
  check = unrolled.solve(
    problem.upper,
    problem.lower,
    problem.init_weights(),
    params0,
    steps=min(low["K"]),
    upper_lr=s_u,
    lower_lr=s_l,
    alpha=0.0,
    smoothness=lipschitz,
  )
  return {
    "problem": problem,
    "params0": params0,
    "seed": seed,
    "sizes": [int(data.y_train.size), int(data.y_val.size), int(data.y_test.size)],
    "features": int(data.x_train.shape[-1]),
    "lipschitz_bound": lipschitz,
    "s_l": s_l,
    "s_u": s_u,
    "lower_lr_exceeds_bound": bool(check.info.lower_lr_exceeds_bound),
  }


def run_seeds(cfg: dict, seeds: list[int], quiet: bool = False) -> list[dict]:
  """Every (K, method) run for every seed (one compile per (K, method)), and the
  baselines per seed. Returns one dict of plain numbers per seed."""
  low, up = cfg["lower"], cfg["upper"]
  prepared = [prepare_seed(cfg, seed) for seed in seeds]
  data = _stack([p["problem"].data for p in prepared])
  params0 = _stack([p["params0"] for p in prepared])
  s_l = jnp.asarray([p["s_l"] for p in prepared], data.x_train.dtype)
  s_u = jnp.asarray([p["s_u"] for p in prepared], data.x_train.dtype)
  out = [
    {k: v for k, v in p.items() if k not in ("problem", "params0")} | {"runs": {}, "histories": {}}
    for p in prepared
  ]
  one = lambda tree, i: jax.tree_util.tree_map(lambda v: v[i : i + 1], tree)
  for K in low["K"]:
    for method in low["methods"]:
      name = NAMES[method]
      common.progress(
        f"[hypercleaning] {name} K={K}: {up['steps']} upper steps x {len(seeds)} seeds", quiet
      )
      # One compiled program per (K, method), called once per seed (a batch
      # of one: vmapping all seeds at once was not faster on one CPU core).
      train = make_trainer(cfg, K, method, cfg["model"]["l2"])
      start = time.perf_counter()
      compiled = train.lower(one(data, 0), one(params0, 0), s_l[:1], s_u[:1]).compile()
      compile_s = time.perf_counter() - start
      for i, o in enumerate(out):
        start = time.perf_counter()
        _, history, status = jax.block_until_ready(
          compiled(one(data, i), one(params0, i), s_l[i : i + 1], s_u[i : i + 1])
        )
        run_s = time.perf_counter() - start
        hist = {k: np.asarray(v[0], np.float64).tolist() for k, v in history.items()}
        o["histories"][f"{name} K={K}"] = hist
        o["runs"][f"{name} K={K}"] = {
          "test_acc": 100 * hist["test_acc"][-1],
          "f1": hist["f1"][-1],
          "val_loss": hist["value"][-1],
          "ms_per_upper_step": 1e3 * run_s / up["steps"],
          "compile_s": compile_s,
          "status": status_lib.status_message(int(status[0])),
        }
  if cfg["baselines"]["enabled"]:
    for p, o in zip(prepared, out):
      common.progress(f"[hypercleaning] seed {p['seed']} baselines", quiet)
      o["baselines"] = baselines(p["problem"], cfg, p["params0"])
  return out


def run(cfg: dict, quiet: bool = False) -> common.ExperimentResult:
  d, low, up = cfg["data"], cfg["lower"], cfg["upper"]
  seeds = [d["seed"] + i for i in range(d["num_seeds"])]
  per_seed = run_seeds(cfg, seeds, quiet)
  first = per_seed[0]
  rows, table2, summary_acc = [], [], {}
  for method in low["methods"]:
    name = NAMES[method]
    wide = {"method": name}
    paper_row = {"method": f"paper {name} (full MNIST)"}
    summary_acc[name] = {}
    for K in low["K"]:
      key = f"{name} K={K}"
      accs = [s["runs"][key]["test_acc"] for s in per_seed]
      stats = mean_se(accs)
      paper = PAPER_TABLE2.get(name, {}).get(K)
      f1 = mean_se([s["runs"][key]["f1"] for s in per_seed])
      summary_acc[name][str(K)] = {**stats, "paper": paper, "f1": f1["mean"], "f1_se": f1["se"]}
      wide[f"K = {K}"] = _pm(stats)
      paper_row[f"K = {K}"] = f"{paper:.2f}" if paper is not None else "-"
      statuses = sorted({s["runs"][key]["status"] for s in per_seed})
      rows.append(
        {
          "method": name,
          "K": K,
          "test_acc": stats["mean"],
          "se": stats["se"],
          "n": stats["n"],
          "paper_acc": paper if paper is not None else "-",
          "f1": mean_se([s["runs"][key]["f1"] for s in per_seed])["mean"],
          "val_loss": mean_se([s["runs"][key]["val_loss"] for s in per_seed])["mean"],
          "ms_per_upper_step": float(
            np.median([s["runs"][key]["ms_per_upper_step"] for s in per_seed])
          ),
          "status": "/".join(statuses),
          "test_acc_per_seed": accs,
        }
      )
    table2 += [wide, paper_row]
  summary_base = {}
  if cfg["baselines"]["enabled"]:
    for key, label in BASELINES.items():
      accs = [s["baselines"][key] for s in per_seed]
      stats = mean_se(accs)
      summary_base[key] = stats
      rows.append(
        {
          "method": label,
          "K": cfg["baselines"]["steps"],
          "test_acc": stats["mean"],
          "se": stats["se"],
          "n": stats["n"],
          "paper_acc": "-",
          "test_acc_per_seed": accs,
        }
      )
  paired, paired_rows = {}, []
  pairs = [("BDA", "RHG"), ("T-RHG", "RHG"), ("BDA", "T-RHG")]
  present = {NAMES[m] for m in low["methods"]}
  for a, b in pairs:
    if a not in present or b not in present:
      continue
    label = f"{a} - {b}"
    paired[label] = {}
    row = {"difference": label}
    for K in low["K"]:
      diffs = [
        s["runs"][f"{a} K={K}"]["test_acc"] - s["runs"][f"{b} K={K}"]["test_acc"] for s in per_seed
      ]
      stats = mean_se(diffs)
      paired[label][str(K)] = {**stats, "per_seed": diffs}
      row[f"K = {K}"] = _pm(stats)
    # K at which the 95% Student-t interval of the mean paired difference
    # (n - 1 degrees of freedom) excludes 0.
    row["95% t-interval excludes 0 at K"] = (
      ", ".join(str(K) for K in low["K"] if excludes_zero(paired[label][str(K)])) or "none"
    )
    paired[label]["excludes_zero"] = row["95% t-interval excludes 0 at K"]
    paired_rows.append(row)
  base_row = {
    "baseline": "test accuracy",
    **{label: _pm(summary_base[key]) for key, label in BASELINES.items() if key in summary_base},
  }
  # Mean over seeds of each run's per-upper-step metrics (for the figure).
  histories = {}
  for key in first["histories"]:
    histories[key] = {
      metric: np.mean([s["histories"][key][metric] for s in per_seed], axis=0).tolist()
      for metric in ("value", "test_acc", "f1")
    }
  exceeds = [s["lower_lr_exceeds_bound"] for s in per_seed]
  summary = {
    "seeds": seeds,
    "n_seeds": len(seeds),
    "sizes": first["sizes"],
    "features": first["features"],
    "pca_dims": d["pca_dims"],
    "lower_lr_scale": low["lower_lr_scale"],
    "upper_lr_scale": low["upper_lr_scale"],
    "lipschitz_bound": mean_se([s["lipschitz_bound"] for s in per_seed]),
    "s_l": mean_se([s["s_l"] for s in per_seed]),
    "lower_lr_exceeds_bound": all(exceeds),
    "lower_lr_exceeds_bound_per_seed": exceeds,
    "acc": summary_acc,
    "baselines": summary_base,
    "paired": paired,
    "table2": table2,
    "paired_rows": paired_rows,
    "baseline_rows": [base_row] if summary_base else [],
  }
  s_l = summary["s_l"]["mean"]
  notes = [
    f"data: {d['dataset']}, train/val/test = {'/'.join(map(str, first['sizes']))}, "
    f"{100 * d['corruption']:.0f}% of training labels corrupted, "
    + (
      f"features: PCA to {d['pca_dims']} dims fitted on each seed's training inputs; "
      if d["pca_dims"]
      else "raw features; "
    )
    + f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}: split, corruption and initial W); "
    f"test_acc = mean over seeds, se = standard error; {up['steps']} upper steps of "
    f"{up['optimizer']} (lr {up['learning_rate']:g}).",
    f"step sizes: s_l = {low['lower_lr_scale']:g}/L, s_u = {low['upper_lr_scale']:g}/L with "
    f"L >= L_f the bound of HyperCleaning.lower_smoothness (mean s_l = {s_l:.3g}); "
    f"s_l > 1/L: {summary['lower_lr_exceeds_bound']} (bda.solve's "
    "info.lower_lr_exceeds_bound with smoothness = L).",
    "paper_acc: Table 2 of the BDA paper (full MNIST, 7000/7000/56000, "
    "its own feature extractor and step sizes); not directly comparable "
    "unless dataset = 'mnist' with the paper's sizes.",
    "f1: F1 score of flagging sample i as corrupted when sigma(x_i) < 1/2.",
    "ms_per_upper_step: median over seeds of one upper step (K lower steps and "
    "the reverse pass), on one pinned core while other jobs ran on the other "
    "core when run through /work/lane.sh.",
  ]
  panels = [("value", "validation loss F"), ("test_acc", "test accuracy"), ("f1", "F1 corrupted")]

  def draw(plt):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, panels):
      for name, hist in histories.items():
        ax.plot(range(1, len(hist[key]) + 1), hist[key], label=name)
      ax.set_xlabel("upper iteration")
      ax.set_title(f"{label} (mean of {len(seeds)} seeds)")
      ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig

  per_seed_out = [{k: v for k, v in s.items() if k != "histories"} for s in per_seed]
  return common.ExperimentResult(
    title=f"Data hyper-cleaning on {d['dataset']} (BDA paper, Section 5.2, Table 2)",
    columns=[
      "method",
      "K",
      "test_acc",
      "se",
      "n",
      "paper_acc",
      "f1",
      "val_loss",
      "ms_per_upper_step",
      "status",
    ],
    rows=rows,
    histories=histories,
    figures={"hypercleaning.png": draw},
    notes=notes,
    extra={"summary": summary, "per_seed": per_seed_out},
  )
