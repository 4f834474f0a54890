"""BOAT's GDA (its BDA) and NGD + RAD (its RHG) on data hyper-cleaning.

A standalone script for the BOAT virtual environment (numpy, torch,
boat_torch and the standard library; it does not import bilevel_jax):

    python boat_hypercleaning.py DATA.npz SETTINGS.json

DATA.npz holds x_train, y_train (noisy labels), x_val, y_val, x_test, y_test,
the initial lower model W0 (d, c), b0 (c,) and, for the minibatch variant,
``batches`` (steps, batch) of training-row indices. SETTINGS.json holds
``methods`` (of "bda", "rhg"), ``variants`` (of "full", "minibatch", "adam";
default ["full"]), ``skip`` ((method, variant) pairs not run), ``batch_size``,
``adam_lr``, ``K`` (list), ``upper_iterations``, ``lower_lr``, ``upper_lr``,
``alpha_init``, ``alpha_decay``, ``threads`` and ``warmup``. One JSON object
goes to stdout.

Variants: ``minibatch``: lower step k of upper iteration t evaluates f on the
rows ``batches[t K + k]`` (``ll_loss`` indexes them through a step counter in
the feed dict, reset before each ``run_iter``; BOAT itself feeds one dict to
all K steps); ``adam``: ``lower_level_opt`` is torch.optim.Adam(adam_lr),
which ``higher`` makes differentiable.

The problem is BOAT's own hyper-cleaning example (examples/data_hyper_cleaning
in its repository): x are per-sample logits, the lower model is a linear
layer y = (W, b) trained by SGD with one learning rate, the upper model by
Adam, and after every upper iteration the lower model keeps its last iterate
(``copy_last_param``)::

    f(x, y) = mean_i sigmoid(x_i) CE(y; u_i, v_i)        (training set)
    F(x, y) = mean_j CE(y; u_j, v_j)                      (validation set)
    GDA:  y_{k+1} = y_k - lr grad_y[alpha_k F + (1 - alpha_k) f](y_k),
          alpha_k = alpha_init * alpha_decay**(k - 1)
    NGD:  y_{k+1} = y_k - lr grad_y f(y_k)
    RAD:  grad_x F(y_K(x)) by reverse mode through the K steps (``higher``).
"""

import copy
import importlib.metadata
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as tf

import boat_torch as boat

METHODS = {"bda": (["GDA", "NGD"], ["RAD"]), "rhg": (["NGD"], ["RAD"])}


class Weights(torch.nn.Module):
  """The upper model of BOAT's example: mean_i sigmoid(x_i) loss_i."""

  def __init__(self, n):
    super().__init__()
    self.x = torch.nn.Parameter(torch.zeros(n))

  def forward(self, losses):
    return (torch.sigmoid(self.x) * losses).mean()


# The loss functions of BOAT's example (configs/loss_func_dhl.py). BOAT loads
# them by dotted name, so they live at the top of this script ("__main__").
def ul_loss(ul_feed_dict, upper_model, lower_model, **kwargs):
  return tf.cross_entropy(lower_model(ul_feed_dict["data"], **kwargs), ul_feed_dict["target"])


def ll_loss(ll_feed_dict, upper_model, lower_model, **kwargs):
  if "batches" in ll_feed_dict:  # variant minibatch: the rows of this lower step
    counter = ll_feed_dict["counter"]
    rows = ll_feed_dict["batches"][counter[0] % ll_feed_dict["batches"].shape[0]]
    counter[0] += 1
    losses = tf.cross_entropy(
      lower_model(ll_feed_dict["data"][rows], **kwargs),
      ll_feed_dict["target"][rows],
      reduction="none",
    )
    return (torch.sigmoid(upper_model.x[rows]) * losses).mean()
  return upper_model(
    tf.cross_entropy(
      lower_model(ll_feed_dict["data"], **kwargs), ll_feed_dict["target"], reduction="none"
    )
  )


def gda_loss(ll_feed_dict, ul_feed_dict, upper_model, lower_model, **kwargs):
  alpha = ll_feed_dict["alpha"]
  return alpha * ul_loss(ul_feed_dict, upper_model, lower_model, **kwargs) + (1 - alpha) * ll_loss(
    ll_feed_dict, upper_model, lower_model, **kwargs
  )


LOSS_CONFIG = {
  "lower_level_loss": {"function": "__main__.ll_loss"},
  "upper_level_loss": {"function": "__main__.ul_loss"},
  "gda_loss": {"function": "__main__.gda_loss"},
}


def build(method, K, data, settings, log_path, variant="full"):
  """A fresh BOAT problem at the initial point: (problem, x model, y model)."""
  x_model = Weights(data["x_train"].shape[0])
  y_model = torch.nn.Linear(data["W0"].shape[0], data["W0"].shape[1])
  with torch.no_grad():
    y_model.weight.copy_(torch.from_numpy(data["W0"].T.copy()))
    y_model.bias.copy_(torch.from_numpy(data["b0"].copy()))
  gm_op, na_op = METHODS[method]
  cfg = {
    "fo_op": None,
    "gm_op": list(gm_op),
    "na_op": list(na_op),
    "lower_iters": K,
    "device": "cpu",
    "accumulate_grad": False,
    "copy_last_param": True,
    "return_grad": False,
    "loss_log_path": log_path,
    "GDA": {"alpha_init": settings["alpha_init"], "alpha_decay": settings["alpha_decay"]},
    "RGT": {"truncate_iter": 0},
    "lower_level_model": y_model,
    "upper_level_model": x_model,
    "lower_level_var": list(y_model.parameters()),
    "upper_level_var": list(x_model.parameters()),
    "lower_level_opt": (
      torch.optim.Adam(y_model.parameters(), lr=settings["adam_lr"])
      if variant == "adam"
      else torch.optim.SGD(y_model.parameters(), lr=settings["lower_lr"])
    ),
    "upper_level_opt": torch.optim.Adam(x_model.parameters(), lr=settings["upper_lr"]),
  }
  problem = boat.Problem(cfg, copy.deepcopy(LOSS_CONFIG))
  problem.build_ll_solver()
  problem.build_ul_solver()
  return problem, x_model, y_model


def lower_feed(ll_feed, variant, data, K, t):
  """The lower feed dict of upper iteration t: with the minibatch variant,
  the (K, batch) rows of its K steps and a fresh step counter."""
  if variant != "minibatch":
    return dict(ll_feed)
  return dict(ll_feed, batches=data["t_batches"][t * K : (t + 1) * K], counter=[0])


def run_one(method, K, data, feeds, settings, tmp, variant="full"):
  """Warm-up iterations on a throwaway problem, then the timed run."""
  ll_feed, ul_feed = feeds
  log_path = os.path.join(tmp, f"loss_{method}_{variant}_{K}.json")
  for _ in range(settings["warmup"]):
    problem, _, _ = build(method, K, data, settings, log_path, variant)
    problem.run_iter(lower_feed(ll_feed, variant, data, K, 0), dict(ul_feed), current_iter=0)
  problem, x_model, y_model = build(method, K, data, settings, log_path, variant)
  wall, reported = [], []
  for t in range(settings["upper_iterations"]):
    feed = lower_feed(ll_feed, variant, data, K, t)
    tic = time.perf_counter()
    _, run_time = problem.run_iter(feed, dict(ul_feed), current_iter=t)
    wall.append(time.perf_counter() - tic)
    reported.append(run_time)
  with torch.no_grad():
    logits = y_model(data["t_x_test"])
    test_acc = (logits.argmax(dim=1) == data["t_y_test"]).double().mean().item()
    val_loss = ul_loss(ul_feed, x_model, y_model).item()
  x = x_model.x.detach().numpy().astype(np.float64)
  return {
    "method": method,
    "variant": variant,
    "K": K,
    "times_s": wall,
    "boat_run_time_s": reported,
    "test_acc": test_acc,
    "val_loss": val_loss,
    "val_loss_history": [h["ul_loss"] for h in problem.loss_history],
    "x_sum": float(x.sum()),
    "x_norm": float(np.linalg.norm(x)),
    "x_head": x[:8].tolist(),
  }


def main(data_path, settings_path):
  with open(settings_path) as handle:
    settings = json.load(handle)
  torch.set_num_threads(int(settings["threads"]))
  torch.manual_seed(0)
  with np.load(data_path) as npz:
    data = {k: npz[k] for k in npz.files}
  for key in ("x_train", "x_val", "x_test", "W0", "b0"):
    data[key] = data[key].astype(np.float32)
  t = {k: torch.from_numpy(data[k]) for k in ("x_train", "x_val", "x_test")}
  labels = {k: torch.from_numpy(data[k].astype(np.int64)) for k in ("y_train", "y_val", "y_test")}
  data["t_x_test"], data["t_y_test"] = t["x_test"], labels["y_test"]
  if "batches" in data:
    data["t_batches"] = torch.from_numpy(data["batches"].astype(np.int64))
  feeds = (
    {"data": t["x_train"], "target": labels["y_train"]},
    {"data": t["x_val"], "target": labels["y_val"]},
  )
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    skip = {tuple(pair) for pair in settings.get("skip", [])}
    for K in settings["K"]:
      for variant in settings.get("variants", ["full"]):
        for method in settings["methods"]:
          if method not in METHODS:
            raise ValueError(
              f"settings `methods`: unknown method {method!r}; choose from {sorted(METHODS)}."
            )
          if (method, variant) in skip:
            continue
          print(
            f"[boat] {method} {variant} K={K}: {settings['upper_iterations']} upper iterations",
            file=sys.stderr,
            flush=True,
          )
          results.append(run_one(method, K, data, feeds, settings, tmp, variant))
  versions = {
    name: importlib.metadata.version(name) for name in ("torch", "boat-torch", "higher", "numpy")
  }
  print(
    json.dumps(
      {
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": sys.version.split()[0],
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: boat_hypercleaning.py DATA.npz SETTINGS.json")
  main(sys.argv[1], sys.argv[2])
