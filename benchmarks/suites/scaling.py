"""Scaling curves of the unrolled hypergradients (issue 5, item 3; GPU item 4).

Four sections, each skipped with ``enabled = false``:

* ``[K]``: time per hypergradient and per upper iteration (hypergradient +
  Adam update, one jitted step) against the number K of unrolled steps, for
  RHG and BDA on MNIST data hyper-cleaning; compile time apart. On a GPU each
  row also gets a roofline estimate from the fully unrolled program.
* ``[dim]``: time per hypergradient against the dimension of y (synthetic
  hyper-cleaning, features d, y = (W, b) of size (d + 1) * 10).
* ``[vmap]``: N small, different bilevel problems (ridge with per-coordinate
  weights, y of dimension ``dim``) in one ``jax.jit(jax.vmap(...))`` call,
  next to a Python loop of N calls of the jitted single-instance function on
  the same instances; alternated, ratio of medians.
* ``[memory]``: memory of the hypergradient against K without and with
  checkpointing: XLA's buffer assignment of the executable (exact per
  program) and the measured peak (host RSS on a CPU, allocator peak on a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel_jax import bda, data, schedules
from experiments import config
from benchmarks import roofline, timing
from benchmarks.runner import SuiteResult
from bilevel_jax._src.problems.hypercleaning import CleaningData, HyperCleaning, accuracy

TITLE = "Scaling of unrolled hypergradients: K, dim(y), vmapped instances, memory"
F = config.Field
METHODS = ("rhg", "bda")
CHECKPOINTS = {"none": False, "sqrt": "sqrt", "step": True}
SCHEMA = {
  "problem": {
    "dataset": F("str", "mnist5k", config.one_of(*data.DATASETS)),
    "n_train": F("int", 2000, config.positive),
    "n_val": F("int", 200, config.positive),
    "dtype": F("str", "float32", config.one_of("float32", "float64")),
  },
  "K": {
    "enabled": F("bool", True),
    "values": F("list[int]", [25, 50, 100, 200], config.positive),
    "methods": F("list[str]", ["rhg", "bda"], config.one_of(*METHODS)),
    "unroll": F(
      "list[int]", [1], config.positive, doc="lax.scan unroll factors to time (1: a loop)"
    ),
    "repeats": F("int", 7, config.positive),
    "roofline": F(
      "str",
      "auto",
      config.one_of("auto", "on", "off"),
      doc="for [K] and [dim] rows; auto: on a GPU only (it needs an unrolled compile)",
    ),
  },
  "dim": {
    "enabled": F("bool", True),
    "features": F("list[int]", [16, 64, 256, 1024], config.positive),
    "n_train": F("int", 2000, config.positive),
    "K": F("int", 100, config.positive),
    "repeats": F("int", 5, config.positive),
  },
  "vmap": {
    "enabled": F("bool", True),
    "instances": F("list[int]", [1, 4, 16, 64, 256, 1024], config.positive),
    "dim": F("int", 10, config.positive),
    "samples": F("int", 20, config.positive),
    "K": F("int", 50, config.positive),
    "repeats": F("int", 5, config.positive),
  },
  "memory": {
    "enabled": F("bool", True),
    "K": F("list[int]", [50, 100, 200, 400], config.positive),
    "checkpoint": F("list[str]", ["none", "sqrt", "step"], config.one_of(*CHECKPOINTS)),
  },
}
COLUMNS = [
  "problem",
  "method",
  "size_name",
  "size",
  "compile_s",
  "median_s",
  "q25_s",
  "q75_s",
  "upper_iter_median_s",
  "speedup",
  "compiled_mib",
  "peak_rss_mib",
  "device_peak_mib",
  "metric_name",
  "metric",
  "roofline_fraction",
]


def _method_kwargs(method: str) -> dict:
  return {"alpha": 0.0} if method == "rhg" else {"alpha": schedules.harmonic(0.5)}


def _hypercleaning(cfg, ctx):
  p = cfg["problem"]
  dtype = jnp.dtype(p["dtype"])
  name = p["dataset"]
  try:
    feats, labels = data.load(name)
  except ImportError as err:
    ctx.log(f"dataset {name} unavailable ({err}); using digits")
    name = "digits"
    feats, labels = data.load(name)
  n_train, n_val = p["n_train"], p["n_val"]
  if name == "digits":
    n_train, n_val = min(n_train, 1000), min(n_val, 50)
  split = data.hypercleaning_split(feats, labels, n_train=n_train, n_val=n_val, seed=0)
  split = jax.tree_util.tree_map(
    lambda a: (
      jnp.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a)
    ),
    split,
  )
  return name, HyperCleaning(split)


def _synthetic_cleaning(features: int, n_train: int, dtype, seed: int = 0) -> HyperCleaning:
  """Gaussian features, labels of a random linear teacher, 30% of the
  training labels replaced at random (as in the MNIST setting)."""
  rng = np.random.default_rng(seed)
  n_val, n_test = max(n_train // 10, 10), max(n_train // 2, 10)
  n = n_train + n_val + n_test
  u = rng.normal(size=(n, features)) / np.sqrt(features)
  labels = np.argmax(u @ rng.normal(size=(features, 10)), axis=1)
  corrupted = np.zeros(n_train, bool)
  corrupted[rng.permutation(n_train)[: int(0.3 * n_train)]] = True
  noisy = labels[:n_train].copy()
  noisy[corrupted] = rng.integers(0, 10, size=int(corrupted.sum()))
  cast = lambda a: jnp.asarray(a, dtype)
  return HyperCleaning(
    CleaningData(
      x_train=cast(u[:n_train]),
      y_train=jnp.asarray(noisy),
      x_val=cast(u[n_train : n_train + n_val]),
      y_val=jnp.asarray(labels[n_train : n_train + n_val]),
      x_test=cast(u[n_train + n_val :]),
      y_test=jnp.asarray(labels[n_train + n_val :]),
      corrupted=jnp.asarray(corrupted),
    )
  )


def _cleaning_fns(prob: HyperCleaning, K: int, method: str, **extra):
  s = 4.0 / prob.lower_smoothness()
  y0 = prob.init_params(10)
  kw = dict(steps=K, upper_lr=s, lower_lr=s, **_method_kwargs(method), **extra)

  def hypergradient(x):
    return bda.hypergradient(prob.upper, prob.lower, x, y0, **kw)

  opt = optax.adam(1e-1)

  def upper_step(x, opt_state):
    _, grad = hypergradient(x)
    updates, opt_state = opt.update(grad, opt_state, x)
    return optax.apply_updates(x, updates), opt_state

  def test_accuracy(x):
    y = bda.solve(prob.upper, prob.lower, x, y0, **kw).y
    return accuracy(y, prob.data.x_test, prob.data.y_test)

  return hypergradient, upper_step, opt, test_accuracy


def _roofline_wanted(mode: str) -> bool:
  return mode == "on" or (mode == "auto" and jax.default_backend() == "gpu")


def unrolled_cost(make_fn, x, steps: int, probes: tuple[int, int] = (4, 8)) -> dict:
  """FLOPs and bytes of the K-step program, extrapolated from two shorter
  fully unrolled versions: cost(K) = cost(b) + (K - b) (cost(b) - cost(a)) / (b - a).

  Every step is the same straight-line code, so past the first steps the
  cost is affine in K (exact to 1e-6 on hyper-cleaning; a tiny toy problem
  whose cost is dominated by scalar bookkeeping fuses differently as K grows,
  so the rule is for steps dominated by real work). This avoids compiling
  the fully unrolled program, ~50 s at K = 100 on a GPU machine. ``make_fn(k)``
  returns the hypergradient with k unrolled steps.
  """
  a, b = probes
  if steps <= b:
    return roofline.cost(timing.compile_timed(make_fn(steps), x)[0])
  ca = roofline.cost(timing.compile_timed(make_fn(a), x)[0])
  cb = roofline.cost(timing.compile_timed(make_fn(b), x)[0])
  out = {}
  for key in ("flops", "bytes"):
    if ca[key] is None or cb[key] is None:
      out[key] = None
    else:
      out[key] = cb[key] + (steps - b) * (cb[key] - ca[key]) / (b - a)
  return out


def _add_roofline(row, cost, x, peaks, bandwidth) -> None:
  """Adds the roofline of ``row["median_s"]`` for a program of ``cost``."""
  row["roofline"] = roofline.estimate(
    row["median_s"], cost["flops"], cost["bytes"], peaks, dtype=x.dtype
  )
  row["roofline_measured_bw"] = roofline.estimate(
    row["median_s"], cost["flops"], cost["bytes"], peaks, dtype=x.dtype, bandwidth=bandwidth
  )
  row["roofline_fraction"] = row["roofline"]["roofline_fraction"]


def _k_rows(cfg, ctx, prob, dataset, peaks, bandwidth):
  kc = cfg["K"]
  x = jnp.zeros(prob.data.y_train.shape, prob.data.x_train.dtype)
  rows = []
  costs: dict = {}
  for K in kc["values"]:
    for method in kc["methods"]:
      for unroll in kc["unroll"]:
        hypergradient, upper_step, opt, test_acc = _cleaning_fns(
          prob, K, method, unroll=min(unroll, K)
        )
        opt_state = opt.init(x)
        with timing.peak_memory() as mem:
          hg, compile_s = timing.compile_timed(hypergradient, x)
          step, _ = timing.compile_timed(upper_step, x, opt_state)
          samples = timing.time_alternating(
            {"hg": lambda: hg(x), "step": lambda: step(x, opt_state)}, kc["repeats"]
          )
        hg_stats = timing.summarize(samples["hg"])
        row = {
          "problem": f"hypercleaning ({dataset})",
          "method": method,
          "size_name": "K",
          "size": K,
          "unroll": unroll,
          "per": "hypergradient",
          "compile_s": compile_s,
          **hg_stats,
          "upper_iter_median_s": timing.summarize(samples["step"])["median_s"],
          "compiled_mib": timing.compiled_memory(hg)["compiled_mib"],
          **mem,
          "metric_name": "test_acc(y_K(0))",
          "metric": float(jax.jit(test_acc)(x)),
        }
        if peaks is not None:
          if (K, method) not in costs:
            costs[(K, method)] = unrolled_cost(
              lambda k: _cleaning_fns(prob, k, method, unroll=True)[0], x, K
            )
          _add_roofline(row, costs[(K, method)], x, peaks, bandwidth)
        rows.append(row)
        ctx.log(
          f"K={K:4d} {method} unroll={unroll}: {1e3 * hg_stats['median_s']:.2f} ms/"
          f"hypergradient, {1e3 * row['upper_iter_median_s']:.2f} ms/upper iteration "
          f"(compile {compile_s:.1f} s)"
          + (
            f", roofline fraction {row['roofline_fraction']:.3f}"
            if row.get("roofline_fraction")
            else ""
          )
        )
  return rows


def _dim_rows(cfg, ctx, dtype, peaks, bandwidth):
  dc = cfg["dim"]
  rows = []
  for features in dc["features"]:
    prob = _synthetic_cleaning(features, dc["n_train"], dtype)
    x = jnp.zeros(prob.data.y_train.shape, dtype)
    hypergradient, _, _, test_acc = _cleaning_fns(prob, dc["K"], "bda")
    with timing.peak_memory() as mem:
      hg, compile_s = timing.compile_timed(hypergradient, x)
      samples = timing.time_alternating({"hg": lambda: hg(x)}, dc["repeats"])["hg"]
    stats = timing.summarize(samples)
    rows.append(
      {
        "problem": "hypercleaning (synthetic)",
        "method": "bda",
        "size_name": "dim(y)",
        "size": (features + 1) * 10,
        "features": features,
        "K": dc["K"],
        "per": "hypergradient",
        "compile_s": compile_s,
        **stats,
        "compiled_mib": timing.compiled_memory(hg)["compiled_mib"],
        **mem,
        "metric_name": "test_acc(y_K(0))",
        "metric": float(jax.jit(test_acc)(x)),
      }
    )
    if peaks is not None:
      cost = unrolled_cost(lambda k: _cleaning_fns(prob, k, "bda", unroll=True)[0], x, dc["K"])
      _add_roofline(rows[-1], cost, x, peaks, bandwidth)
    ctx.log(
      f"dim(y)={(features + 1) * 10:6d}: {1e3 * stats['median_s']:.2f} ms/hypergradient"
      + (
        f", roofline fraction {rows[-1]['roofline_fraction']:.3f}"
        if rows[-1].get("roofline_fraction")
        else ""
      )
    )
  return rows


def ridge_instances(num: int, dim: int, samples: int, dtype, seed: int = 0):
  """``num`` ridge problems with per-coordinate weights exp(x_j):

      f(x, y) = 1/(2n) ||A y - b||^2 + 1/2 sum_j exp(x_j) y_j^2
      F(x, y) = 1/(2n) ||A_val y - b_val||^2

  Returns (xs, data) with a leading instance axis on every leaf.
  """
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(num, samples, dim))
  a_val = rng.normal(size=(num, samples, dim))
  truth = rng.normal(size=(num, dim)) * (rng.random((num, dim)) < 0.5)
  noise = lambda: 0.5 * rng.normal(size=(num, samples))
  b = np.einsum("nsd,nd->ns", a, truth) + noise()
  b_val = np.einsum("nsd,nd->ns", a_val, truth) + noise()
  cast = lambda v: jnp.asarray(v, dtype)
  xs = cast(rng.normal(size=(num, dim)) * 0.5 - 1.0)
  return xs, {"a": cast(a), "b": cast(b), "a_val": cast(a_val), "b_val": cast(b_val)}


def ridge_lower(x, y, d):
  r = d["a"] @ y - d["b"]
  return 0.5 * jnp.mean(r**2) + 0.5 * jnp.sum(jnp.exp(x) * y**2)


def ridge_upper(x, y, d):
  del x
  r = d["a_val"] @ y - d["b_val"]
  return 0.5 * jnp.mean(r**2)


def ridge_hypergradient(x, d, *, steps: int, alpha=None, unroll=1):
  """BDA hypergradient of one ridge instance (step 1/L from the data).

  ``alpha`` defaults to BDA's harmonic 0.5/k; ``alpha=0`` is RHG.
  """
  lipschitz = jnp.sum(d["a"] ** 2) / d["a"].shape[0] + jnp.max(jnp.exp(x))
  s = 1.0 / lipschitz
  return bda.hypergradient(
    functools.partial(ridge_upper, d=d),
    functools.partial(ridge_lower, d=d),
    x,
    jnp.zeros_like(x),
    steps=steps,
    upper_lr=s,
    lower_lr=s,
    unroll=unroll,
    alpha=schedules.harmonic(0.5) if alpha is None else alpha,
  )


def _vmap_rows(cfg, ctx, dtype):
  vc = cfg["vmap"]
  rows = []
  single_fn = functools.partial(ridge_hypergradient, steps=vc["K"])
  single = single_compile = None
  for num in vc["instances"]:
    xs, dat = ridge_instances(num, vc["dim"], vc["samples"], dtype)
    per_instance = [(xs[i], jax.tree_util.tree_map(lambda a: a[i], dat)) for i in range(num)]
    if single is None:  # one executable serves every instance of every size
      single, single_compile = timing.compile_timed(single_fn, *per_instance[0])
    batched, batched_compile = timing.compile_timed(jax.vmap(single_fn), xs, dat)
    loop = lambda: [single(x, d) for x, d in per_instance]
    samples = timing.time_alternating(
      {"vmap": lambda: batched(xs, dat), "loop": loop}, vc["repeats"]
    )
    sv, sl = timing.summarize(samples["vmap"]), timing.summarize(samples["loop"])
    ratio = sl["median_s"] / sv["median_s"]
    check = float(jnp.max(jnp.abs(batched(xs, dat)[1][-1] - single(*per_instance[-1])[1])))
    common = {
      "problem": f"ridge dim {vc['dim']}, K={vc['K']}",
      "size_name": "instances",
      "size": num,
      "per": "all instances",
      "metric_name": "max|vmap - loop| grad",
      "metric": check,
    }
    rows.append(
      {**common, "method": "vmap (one call)", "compile_s": batched_compile, **sv, "speedup": ratio}
    )
    rows.append({**common, "method": "loop of jitted calls", "compile_s": single_compile, **sl})
    ctx.log(
      f"{num:5d} instances: vmapped {1e3 * sv['median_s']:.2f} ms, loop "
      f"{1e3 * sl['median_s']:.2f} ms, ratio {ratio:.1f}x"
    )
  return rows


def _memory_rows(cfg, ctx, prob, dataset):
  mc = cfg["memory"]
  x = jnp.zeros(prob.data.y_train.shape, prob.data.x_train.dtype)
  rows = []
  for K in mc["K"]:
    for ck in mc["checkpoint"]:
      fn = _cleaning_fns(prob, K, "bda", checkpoint=CHECKPOINTS[ck])[0]
      with timing.peak_memory() as mem:
        compiled, compile_s = timing.compile_timed(fn, x)
        seconds = timing.time_call(compiled, x)
      rows.append(
        {
          "problem": f"hypercleaning ({dataset})",
          "method": f"bda checkpoint={ck}",
          "size_name": "K",
          "size": K,
          "per": "hypergradient",
          "compile_s": compile_s,
          "median_s": seconds,
          "repeats": 1,
          **timing.compiled_memory(compiled),
          **mem,
        }
      )
      ctx.log(
        f"memory K={K:4d} checkpoint={ck:5s}: "
        f"{rows[-1]['compiled_mib']:.1f} MiB compiled, peak RSS "
        f"{mem['peak_rss_mib']:.0f} MiB"
      )
  return rows


def _figures(rows):
  def draw(plt):
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [
      (
        "K",
        lambda r: (
          r["size_name"] == "K"
          and r.get("per") == "hypergradient"
          and "checkpoint" not in r["method"]
        ),
        "median_s",
        "time per hypergradient (s)",
      ),
      ("dim(y)", lambda r: r["size_name"] == "dim(y)", "median_s", "time per hypergradient (s)"),
      (
        "instances",
        lambda r: r["size_name"] == "instances",
        "median_s",
        "time for all instances (s)",
      ),
      ("K", lambda r: "checkpoint" in str(r["method"]), "compiled_mib", "compiled memory (MiB)"),
    ]
    for ax, (xlabel, keep, key, ylabel) in zip(axes, panels):
      chosen = [r for r in rows if keep(r) and r.get(key) is not None]
      for label in dict.fromkeys(
        f"{r['method']}" + (f" unroll={r['unroll']}" if r.get("unroll", 1) != 1 else "")
        for r in chosen
      ):
        pts = sorted(
          (r["size"], r[key])
          for r in chosen
          if f"{r['method']}" + (f" unroll={r['unroll']}" if r.get("unroll", 1) != 1 else "")
          == label
        )
        ax.plot(*zip(*pts), marker="o", label=label)
      ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
      if chosen:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

  return {"scaling.png": draw}


def run(cfg, ctx) -> SuiteResult:
  dtype = jnp.dtype(cfg["problem"]["dtype"])
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    jax.config.update("jax_enable_x64", True)
  dataset, prob = _hypercleaning(cfg, ctx)
  peaks = bandwidth = None
  notes = []
  if _roofline_wanted(cfg["K"]["roofline"]):
    peaks = roofline.spec_peaks()
    if peaks is None:
      notes.append(f"No spec-sheet peaks known for {jax.devices()[0].device_kind}; no roofline.")
    else:
      bandwidth = roofline.measured_bandwidth()
      notes.append(
        f"Roofline: spec bandwidth {peaks['bandwidth_Bps'] / 1e12:.2f} TB/s, "
        f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s; bytes and FLOPs "
        "from XLA's cost analysis of the fully unrolled program. "
        "roofline_fraction = bound / measured time (1 = at the bound)."
      )
  rows = []
  if cfg["K"]["enabled"]:
    rows += _k_rows(cfg, ctx, prob, dataset, peaks, bandwidth)
    ctx.save_partial(rows)
  if cfg["vmap"]["enabled"]:
    rows += _vmap_rows(cfg, ctx, dtype)
    ctx.save_partial(rows)
  if cfg["memory"]["enabled"]:
    rows += _memory_rows(cfg, ctx, prob, dataset)
    ctx.save_partial(rows)
  if cfg["dim"]["enabled"]:
    rows += _dim_rows(cfg, ctx, dtype, peaks, bandwidth)
  notes.append(
    "Times are medians of alternated repeats after a warm-up call; compile time "
    "is measured apart (lower + compile). peak_rss_mib is the process's peak "
    "resident memory during the row (reset before it), so it includes the "
    "runtime; compiled_mib is XLA's buffer assignment of the executable."
  )
  return SuiteResult(
    title=TITLE,
    columns=COLUMNS,
    rows=rows,
    notes=notes,
    figures=_figures(rows),
    extra={"dataset": dataset},
  )
