"""The TorchOpt side of the reweighting benchmark (its own venv; no bilevel_jax).

    python benchmarks/reweighting/torchopt_side.py DATA.npz SETTINGS.json

One upper step, as TorchOpt's meta-learning examples write it:

    inner = torchopt.MetaAdam(net, lr, eps_root=...)   # fresh Adam state
    for k in range(K):                                 # differentiable Adam steps
        inner.step(mean(sigmoid(x[I_k]) * CE(net(u[I_k]), v[I_k])))
    F = CE(net(u_val[J]), v_val[J]).mean()
    upper_opt.zero_grad(); F.backward(); upper_opt.step()   # RHG: reverse through K steps
    torchopt.stop_gradient(net)                        # theta_K becomes the next theta_0
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_common


def main(data_path, settings_path):
  data, settings = torch_common.load(data_path, settings_path)
  import torch
  import torch.nn.functional as tf
  import torchopt

  K, upper_steps = int(settings["K"]), int(settings["upper_steps"])
  xt, yt, xv, yv = data["x_train"], data["y_train"], data["x_val"], data["y_val"]
  idx, val_idx = data["train_idx"], data["val_idx"]

  def upper_step(net, x, upper_opt, t):
    inner = torchopt.MetaAdam(net, lr=settings["inner_lr"], eps_root=settings["eps_root"])
    for k in range(K):
      i = idx[t, k]
      ce = tf.cross_entropy(net(xt[i]), yt[i], reduction="none")
      inner.step((torch.sigmoid(x[i]) * ce).mean())
    j = val_idx[t]
    outer = tf.cross_entropy(net(xv[j]), yv[j])
    upper_opt.zero_grad()
    outer.backward()
    upper_opt.step()
    torchopt.stop_gradient(net)
    return outer.item()

  def fresh():
    net = torch_common.MLP.build(data)
    x = torch.zeros(xt.shape[0], requires_grad=True)
    return net, x, torch.optim.Adam([x], lr=settings["outer_lr"])

  state = fresh()
  for _ in range(int(settings["warmup"])):  # throwaway warm-up steps
    upper_step(*state, 0)
  net, x, upper_opt = fresh()
  times, cpu, history = [], [], []
  for t in range(upper_steps):
    tic, cpu_tic = time.perf_counter(), time.process_time()
    history.append(upper_step(net, x, upper_opt, t))
    times.append(time.perf_counter() - tic)
    cpu.append(time.process_time() - cpu_tic)
  clean, corrupted = torch_common.weight_means(x, data)
  torch_common.emit(
    "torchopt",
    ("torchopt",),
    settings,
    {
      "times_s": times,
      "cpu_times_s": cpu,
      "test_acc": torch_common.test_accuracy(net, data),
      "val_loss_history": history,
      "mean_weight_clean": clean,
      "mean_weight_corrupted": corrupted,
    },
  )


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit("usage: torchopt_side.py DATA.npz SETTINGS.json")
  main(sys.argv[1], sys.argv[2])
