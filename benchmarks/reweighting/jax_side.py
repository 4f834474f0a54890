"""The JAX side of the reweighting benchmark (run by bench_reweighting_peers.py).

    python benchmarks/reweighting/jax_side.py DATA.npz SETTINGS.json

Prints one JSON object. Two implementations of the same upper step run here,
alternating call by call so both see the same phases of a shared machine:

  * ``scan``: hand-written `jax.lax.scan` over the K lower Adam steps
    (``optax.adam``), reverse mode through the scan (RHG), an optax upper
    step; the reference for the library's overhead.
  * ``library``: `bilevel_jax.bda.hypergradient` with ``lower_optimizer=`` and
    ``lower_batches=``, when the installed bilevel_jax has them (detected by
    `inspect.signature`); otherwise reported as unavailable.

The math (the same in the TorchOpt and betty scripts):

    theta = (W1, b1, W2, b2), MLP 784-H-10 with ReLU
    f(x, theta; I) = mean_{i in I} sigmoid(x_i) CE(theta; u_i, v_i)   (train minibatch I)
    F(theta; J)    = mean_{j in J} CE(theta; u_j, v_j)                (val minibatch J)
    theta_{k+1}, s_{k+1} = Adam(theta_k, s_k, grad_theta f(x, theta_k; I_k)),  k < K,
        from theta_0 = theta_K of the previous upper step (stop-gradient) and
        a fresh Adam state s_0
    g = d F(theta_K(x); J) / dx   (reverse mode through the K steps)
    x <- upper optimizer (Adam) step with g
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import sys
import time


def _set_threads(threads: int) -> None:
  """XLA's CPU intra-op threads = ``threads`` (before jax is imported)."""
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[name] = str(threads)
  flags = os.environ.get("XLA_FLAGS", "")
  if threads == 1:
    flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  else:
    flags += f" intra_op_parallelism_threads={threads}"
  os.environ["XLA_FLAGS"] = flags.strip()


def _load(data_path, settings_path):
  import numpy as np

  with open(settings_path) as handle:
    settings = json.load(handle)
  with np.load(data_path) as npz:
    data = {k: npz[k] for k in npz.files}
  return data, settings


def mlp_logits(theta, images):
  import jax

  hidden = jax.nn.relu(images @ theta["W1"] + theta["b1"])
  return hidden @ theta["W2"] + theta["b2"]


def cross_entropy(theta, images, labels):
  """Per-sample CE(theta; u, v)."""
  import jax
  import jax.numpy as jnp

  logp = jax.nn.log_softmax(mlp_logits(theta, images))
  return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]


def make_objectives(arrays):
  """f(x, theta, idx) on a training minibatch and F(theta, idx) on a
  validation minibatch, indices into the arrays closed over."""
  import jax

  def lower(x, theta, idx):
    ce = cross_entropy(theta, arrays["x_train"][idx], arrays["y_train"][idx])
    return (jax.nn.sigmoid(x[idx]) * ce).mean()

  def upper(theta, idx):
    return cross_entropy(theta, arrays["x_val"][idx], arrays["y_val"][idx]).mean()

  return lower, upper


def make_scan_step(arrays, settings, remat=False):
  """The hand-written upper step: ``step(x, theta, upper_state, idx (K, B),
  val_idx (B_val,)) -> (x, theta_K, upper_state, F)``.

  ``remat=True`` wraps the scan body in `jax.checkpoint`: the reverse pass
  recomputes each lower step from its carry (theta_k, Adam state) instead of
  storing the step's intermediates (same values, fewer stored residuals).
  """
  import jax
  import optax

  lower, upper = make_objectives(arrays)
  inner = optax.adam(settings["inner_lr"], eps_root=settings["eps_root"])
  outer = optax.adam(settings["outer_lr"])

  def phi(x, theta0, idx, val_idx):
    def body(carry, batch):
      theta, state = carry
      grads = jax.grad(lower, argnums=1)(x, theta, batch)
      updates, state = inner.update(grads, state, theta)
      return (optax.apply_updates(theta, updates), state), None

    if remat:
      body = jax.checkpoint(body)
    (theta, _), _ = jax.lax.scan(body, (theta0, inner.init(theta0)), idx)
    return upper(theta, val_idx), theta

  def step(x, theta0, upper_state, idx, val_idx):
    (value, theta), g = jax.value_and_grad(phi, has_aux=True)(x, theta0, idx, val_idx)
    updates, upper_state = outer.update(g, upper_state, x)
    return optax.apply_updates(x, updates), theta, upper_state, value

  return step, outer


def library_available() -> tuple[bool, str]:
  """Whether bda.hypergradient/solve take ``lower_optimizer`` and ``lower_batches``."""
  from bilevel_jax import bda

  params = set(inspect.signature(bda.solve).parameters)
  params |= set(inspect.signature(bda.hypergradient).parameters)
  missing = [n for n in ("lower_optimizer", "lower_batches") if n not in params]
  if missing:
    return False, (
      "library path unavailable: bilevel_jax.bda.solve has no "
      + ", ".join(f"`{n}`" for n in missing)
    )
  return True, ""


def make_library_step(arrays, settings, checkpoint=False):
  """The same upper step through ``bda.hypergradient``.

  ``lower_fn(x, theta, batch)`` receives the k-th slice of ``lower_batches``
  (the (K, B) training indices); ``upper_fn(x, theta)`` closes over the
  validation minibatch of this upper step. ``checkpoint=True``: the
  library's rematerialisation of each step (as ``scan_remat``).
  """
  import optax

  from bilevel_jax import bda

  lower, upper = make_objectives(arrays)
  inner = optax.adam(settings["inner_lr"], eps_root=settings["eps_root"])
  outer = optax.adam(settings["outer_lr"])
  params = inspect.signature(bda.solve).parameters
  extra = {"steps": settings["K"], "lower_optimizer": inner}
  if checkpoint:
    extra["checkpoint"] = True
  if "method" in params or "method" in inspect.signature(bda.hypergradient).parameters:
    extra["method"] = "rhg"
  elif "alpha" in params:
    extra["alpha"] = 0.0  # RHG: BDA without the upper-level term
  # s_u multiplies grad F, which RHG (alpha = 0) drops: any positive value;
  # lower_lr only where the signature requires it (the optimizer's lr rules).
  for name, value in (("upper_lr", 1.0), ("lower_lr", settings["inner_lr"])):
    if name in params and params[name].default is inspect.Parameter.empty:
      extra[name] = value

  def library_step(x, theta0, upper_state, idx, val_idx):
    value, g, solution = bda.hypergradient(
      lambda x_, theta: upper(theta, val_idx),
      lower,
      x,
      theta0,
      lower_batches=idx,
      return_info=True,
      **extra,
    )
    updates, upper_state = outer.update(g, upper_state, x)
    return optax.apply_updates(x, updates), solution.y, upper_state, value

  return library_step, outer


def main(data_path, settings_path):
  data, settings = _load(data_path, settings_path)
  _set_threads(int(settings["threads"]))
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  arrays = {k: jnp.asarray(data[k]) for k in ("x_train", "y_train", "x_val", "y_val")}
  theta0 = {k: jnp.asarray(data[k]) for k in ("W1", "b1", "W2", "b2")}
  idx, val_idx = jnp.asarray(data["train_idx"]), jnp.asarray(data["val_idx"])
  x0 = jnp.zeros(data["x_train"].shape[0], jnp.float32)
  impls = {
    "scan": make_scan_step(arrays, settings),
    "scan_remat": make_scan_step(arrays, settings, remat=True),
  }
  ok, why = library_available()
  if ok:
    impls["library"] = make_library_step(arrays, settings)
    impls["library_remat"] = make_library_step(arrays, settings, checkpoint=True)

  compiled, compile_s, temp_mib = {}, {}, {}
  for name, (step, outer) in list(impls.items()):
    args = (x0, theta0, outer.init(x0), idx[0], val_idx[0])
    tic = time.perf_counter()
    try:
      compiled[name] = jax.jit(step).lower(*args).compile()
    except (TypeError, ValueError) as err:  # the library's API differs from the guess
      if name.startswith("scan"):
        raise
      why = f"library path failed to trace: {type(err).__name__}: {err}"
      del impls[name]
      continue
    compile_s[name] = time.perf_counter() - tic
    mem = compiled[name].memory_analysis()
    temp_mib[name] = getattr(mem, "temp_size_in_bytes", -1) / 2**20 if mem is not None else None
  rss_after_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

  warmup, upper_steps = int(settings["warmup"]), int(settings["upper_steps"])
  states = {name: (x0, theta0, outer.init(x0)) for name, (_, outer) in impls.items()}
  for name in impls:  # warm-up calls, results thrown away
    for _ in range(warmup):
      jax.block_until_ready(compiled[name](*states[name], idx[0], val_idx[0]))
  times = {name: [] for name in impls}
  cpu = {name: [] for name in impls}
  history = {name: [] for name in impls}
  for t in range(upper_steps):
    order = list(impls) if t % 2 == 0 else list(reversed(impls))  # alternate who goes first
    for name in order:
      tic, cpu_tic = time.perf_counter(), time.process_time()
      x, theta, ustate, value = jax.block_until_ready(
        compiled[name](*states[name], idx[t], val_idx[t])
      )
      times[name].append(time.perf_counter() - tic)
      cpu[name].append(time.process_time() - cpu_tic)
      states[name] = (x, theta, ustate)
      history[name].append(float(value))

  test_x, test_y = jnp.asarray(data["x_test"]), np.asarray(data["y_test"])
  results = {}
  for name in impls:
    x, theta, _ = states[name]
    pred = np.asarray(jnp.argmax(mlp_logits(theta, test_x), axis=1))
    w = np.asarray(jax.nn.sigmoid(x))
    corrupted = data["corrupted"].astype(bool)
    results[name] = {
      "compile_s": compile_s[name],
      "xla_temp_mib": temp_mib[name],
      "times_s": times[name],
      "cpu_times_s": cpu[name],
      "test_acc": float(np.mean(pred == test_y)),
      "val_loss_history": history[name],
      "mean_weight_clean": float(w[~corrupted].mean()),
      "mean_weight_corrupted": float(w[corrupted].mean()),
    }
  for name, result in results.items():
    if name != "scan":
      a, b = np.asarray(history["scan"]), np.asarray(history[name])
      result["max_rel_gap_to_scan"] = float(np.max(np.abs(a - b) / np.abs(a)))
  import jaxlib

  versions = {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
  }
  print(
    json.dumps(
      {
        "impl": "jax",
        "results": results,
        "library_status": why or "available",
        "versions": versions,
        "python": sys.version.split()[0],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_after_compile_mib": rss_after_compile / 1024,
      }
    )
  )


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: jax_side.py DATA.npz SETTINGS.json")
  main(sys.argv[1], sys.argv[2])
