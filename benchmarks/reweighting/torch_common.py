"""What the TorchOpt and betty scripts share (numpy, torch and the standard
library only: they run in the peers' own virtual environments).

The math is that of ``jax_side.py``; data, initial model and every minibatch
index come from the same DATA.npz.
"""

import json
import os
import resource
import sys


def set_threads(threads: int) -> None:
  """OMP/MKL threads before torch is imported; torch.set_num_threads after."""
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[name] = str(threads)


def load(data_path, settings_path):
  import numpy as np
  import torch

  with open(settings_path) as handle:
    settings = json.load(handle)
  set_threads(int(settings["threads"]))
  torch.set_num_threads(int(settings["threads"]))
  torch.set_num_interop_threads(1)
  with np.load(data_path) as npz:
    raw = {k: npz[k] for k in npz.files}
  data = {}
  for key, value in raw.items():
    if key.startswith("y_") or key.endswith("_idx"):
      data[key] = torch.from_numpy(value.astype(np.int64))
    elif key == "corrupted":
      data[key] = torch.from_numpy(value.astype(bool))
    else:
      data[key] = torch.from_numpy(value.astype(np.float32))
  return data, settings


class MLP:
  """Builds ``torch.nn.Sequential(Linear(784, H), ReLU, Linear(H, 10))`` with the
  shared initial weights (W stored (in, out) in DATA.npz, transposed here)."""

  @staticmethod
  def build(data):
    import torch

    d, h = data["W1"].shape
    c = data["W2"].shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, c))
    with torch.no_grad():
      net[0].weight.copy_(data["W1"].T)
      net[0].bias.copy_(data["b1"])
      net[2].weight.copy_(data["W2"].T)
      net[2].bias.copy_(data["b2"])
    return net


def test_accuracy(logits_fn, data):
  import torch

  with torch.no_grad():
    pred = logits_fn(data["x_test"]).argmax(dim=1)
    return (pred == data["y_test"]).double().mean().item()


def weight_means(x, data):
  import torch

  with torch.no_grad():
    w = torch.sigmoid(x.detach())
    mask = data["corrupted"]
    return float(w[~mask].mean()), float(w[mask].mean())


def emit(impl, packages, settings, result):
  """Prints the one JSON object the runner reads."""
  import importlib.metadata

  import torch

  versions = {name: importlib.metadata.version(name) for name in ("torch", "numpy", *packages)}
  print(
    json.dumps(
      {
        "impl": impl,
        "results": {impl: result},
        "versions": versions,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      }
    )
  )
