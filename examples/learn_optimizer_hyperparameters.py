"""Learning the learning rate and weight decay of an Optax optimizer by
hypergradient, while training an MLP on scikit-learn's digits.

The lower iteration is AdamW with its learning rate and weight decay injected
by ``optax.inject_hyperparams``; they are functions of the upper variable
x = (log learning rate, log weight decay):

    lower_optimizer = lambda x: optax.inject_hyperparams(optax.adamw)(
        learning_rate=exp(x[0]), weight_decay=exp(x[1]))

Each upper step runs K AdamW steps on training minibatches (a sampler inside
the unrolled loop) from the current network, differentiates the validation
loss of the result through the K steps, the optimizer's state included
(RHG), and updates x with Adam; the network continues from y_K (online
hyperparameter learning). The baseline trains with the initial
hyperparameters for the same number of steps.

    python examples/learn_optimizer_hyperparameters.py           # default size
    python examples/learn_optimizer_hyperparameters.py --small   # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel_jax import bda, data


def init_mlp(key, sizes):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append(
      {"w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)}
    )
  return params


def logits(params, feats):
  for layer in params[:-1]:
    feats = jnp.tanh(feats @ layer["w"] + layer["b"][None])
  return feats @ params[-1]["w"] + params[-1]["b"][None]


def loss(params, feats, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(params, feats), labels))


def accuracy(params, feats, labels):
  return float(jnp.mean(jnp.argmax(logits(params, feats), -1) == labels))


def make_optimizer(x):
  """AdamW whose learning rate and weight decay are functions of x."""
  return optax.inject_hyperparams(optax.adamw)(
    learning_rate=jnp.exp(x[0]), weight_decay=jnp.exp(x[1]), eps_root=1e-12
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny run for CI (seconds)")
  parser.add_argument("--hidden", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--inner-steps", type=int, default=20)
  parser.add_argument("--upper-steps", type=int, default=100)
  parser.add_argument("--lr0", type=float, default=1e-3, help="initial learning rate")
  parser.add_argument("--wd0", type=float, default=1e-2, help="initial weight decay")
  parser.add_argument("--upper-lr", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.small:
    args.hidden, args.inner_steps, args.upper_steps = 8, 3, 3

  features, labels = data.load("digits")
  perm = np.random.default_rng(args.seed).permutation(labels.size)
  tr, va, te = perm[:1000], perm[1000:1300], perm[1300:]
  x_tr, y_tr = jnp.asarray(features[tr]), jnp.asarray(labels[tr])
  x_va, y_va = jnp.asarray(features[va]), jnp.asarray(labels[va])
  x_te, y_te = jnp.asarray(features[te]), jnp.asarray(labels[te])

  def sample(k, key):
    idx = jax.random.randint(key, (args.batch,), 0, x_tr.shape[0])
    return x_tr[idx], y_tr[idx]

  lower = lambda x, params, batch: loss(params, *batch)
  upper = lambda x, params: loss(params, x_va, y_va)

  @jax.jit
  def hypergradient(x, params, key):
    value, grad, sol = bda.hypergradient(
      upper,
      lower,
      x,
      params,
      return_info=True,
      steps=args.inner_steps,
      upper_lr=1.0,
      alpha=0.0,
      lower_optimizer=make_optimizer,
      lower_batches=sample,
      key=key,
    )
    return value, grad, sol.y, sol.info.status

  @jax.jit
  def train_fixed(x, params, key):
    """The baseline: the same number of AdamW steps with the hyperparameters x."""
    return bda.solve(
      upper,
      lower,
      x,
      params,
      steps=args.inner_steps * args.upper_steps,
      upper_lr=1.0,
      alpha=0.0,
      lower_optimizer=make_optimizer,
      lower_batches=sample,
      key=key,
    ).y

  x0 = jnp.log(jnp.array([args.lr0, args.wd0]))
  params0 = init_mlp(jax.random.PRNGKey(args.seed), [64, args.hidden, 10])
  key = jax.random.PRNGKey(args.seed + 1)
  baseline = train_fixed(x0, params0, key)

  x, params = x0, params0
  optimizer = optax.adam(args.upper_lr)
  opt_state = optimizer.init(x)
  times, values = [], []
  for step in range(args.upper_steps):
    start = time.perf_counter()
    value, grad, params, status = hypergradient(x, params, jax.random.fold_in(key, step))
    updates, opt_state = optimizer.update(grad, opt_state, x)
    x = optax.apply_updates(x, updates)
    jax.block_until_ready(x)
    times.append(time.perf_counter() - start)
    values.append(float(value))
    if int(status) != 0:
      raise RuntimeError(f"lower iterations failed at upper step {step} (status {status}).")
  per_step = float(np.median(times[1:])) if len(times) > 1 else times[0]
  lr, wd = np.exp(np.asarray(x))
  print(
    f"digits, MLP 64-{args.hidden}-10, {args.upper_steps} upper steps of K = "
    f"{args.inner_steps} AdamW steps (batch {args.batch})"
  )
  print(f"learning rate {args.lr0:.2e} -> {lr:.2e}, weight decay {args.wd0:.2e} -> {wd:.2e}")
  print(f"validation loss {values[0]:.4f} (first step) -> {values[-1]:.4f} (last step)")
  print(
    f"test accuracy: fixed initial hyperparameters {accuracy(baseline, x_te, y_te):.3f}, "
    f"learned online {accuracy(params, x_te, y_te):.3f}; "
    f"{1e3 * per_step:.1f} ms / upper step"
  )
  return dict(
    lr=float(lr),
    weight_decay=float(wd),
    values=values,
    baseline_accuracy=accuracy(baseline, x_te, y_te),
    accuracy=accuracy(params, x_te, y_te),
    ms_per_step=1e3 * per_step,
  )


if __name__ == "__main__":
  # From the repository: JAX's persistent compilation cache (experiments.jax_cache;
  # .jax_cache/, BILEVEL_JAX_NO_CACHE=1 to opt out), so a second run loads its programs.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if importlib.util.find_spec("experiments") is not None:
    importlib.import_module("experiments.jax_cache").enable()
  main()
