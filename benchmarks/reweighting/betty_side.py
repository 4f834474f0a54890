"""The betty side of the reweighting benchmark (its own venv; no bilevel_jax).

    python benchmarks/reweighting/betty_side.py DATA.npz SETTINGS.json

betty's iterative differentiation: the classifier is an ``IterativeProblem``
(betty patches the module with functorch and torch.optim.Adam into its
differentiable Adam, so gradients flow through the K parameter updates); the
reweighting logits are an ``ImplicitProblem`` with ``first_order=False``, so
the lower steps keep their graph and the upper gradient is plain autograd
through the K steps (RHG). ``unroll_steps=K``: the engine runs K lower steps,
then one upper step. One upper step is K ``Engine.train_step`` calls.

Matched to the other sides: the minibatches come from DATA.npz (``get_batch``
overrides betty's data loaders); at the start of each inner loop
(``on_inner_loop_start``) theta is detached (stop-gradient, warm start) and
the Adam state is reset to zero (fresh state, as MetaAdam/optax.adam.init).
betty's differentiable Adam computes sqrt(v) with no eps_root, whose
derivative at v = 0 (a weight whose gradient is exactly zero, e.g. an
always-black pixel) is 0/0 = NaN in the reverse pass, so the classifier uses
betty's documented hook ``custom_optimizer_step`` with the same Adam plus
``eps_root`` inside the square root (optax.adam / torchopt.MetaAdam's
formula); ``--betty-adam`` keeps betty's own step instead.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_common


def main(data_path, settings_path, own_adam=False):
  data, settings = torch_common.load(data_path, settings_path)
  import logging

  import torch
  import torch.nn.functional as tf
  from betty.configs import Config, EngineConfig
  from betty.engine import Engine
  from betty.problems import ImplicitProblem, IterativeProblem

  logging.disable(logging.INFO)  # betty logs problem information at INFO
  K, upper_steps = int(settings["K"]), int(settings["upper_steps"])
  xt, yt, xv, yv = data["x_train"], data["y_train"], data["x_val"], data["y_val"]
  idx, val_idx = data["train_idx"], data["val_idx"]
  lr, eps_root = settings["inner_lr"], settings["eps_root"]
  counter = {"t": 0, "k": 0}

  class Weights(torch.nn.Module):
    def __init__(self, n):
      super().__init__()
      self.x = torch.nn.Parameter(torch.zeros(n))

  class Reweight(ImplicitProblem):
    def get_batch(self):
      return val_idx[counter["t"]]

    def training_step(self, j):
      loss = tf.cross_entropy(self.classifier(xv[j]), yv[j])
      self.last_loss = loss.item()
      return loss

  class Classifier(IterativeProblem):
    def forward(self, inputs):
      return self.fmodule(self.params, self.buffers, inputs)

    def get_batch(self):
      return idx[counter["t"], counter["k"]]

    def training_step(self, i):
      ce = tf.cross_entropy(self.forward(xt[i]), yt[i], reduction="none")
      return (torch.sigmoid(self.reweight.module.x[i]) * ce).mean()

    def on_inner_loop_start(self):
      self.params = tuple(p.detach().requires_grad_() for p in self.params)
      for state in self.optimizer.state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(state["exp_avg"])
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])

    def adam_step(self, *args, **kwargs):
      """betty's DifferentiableAdam.step with eps_root inside the square root."""
      params = self.params
      group = self.optimizer.param_groups[0]
      beta1, beta2 = group["betas"]
      new = []
      for i, p in enumerate(params):
        state = self.optimizer.state[i]
        state["step"] += 1
        g = p.grad
        state["exp_avg"] = state["exp_avg"] * beta1 + (1 - beta1) * g
        state["exp_avg_sq"] = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
        m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        new.append(p - group["lr"] * m_hat / (torch.sqrt(v_hat + eps_root) + group["eps"]))
      return tuple(new)

  if not own_adam:
    Classifier.custom_optimizer_step = Classifier.adam_step

  def build():
    counter.update(t=0, k=0)
    net = torch_common.MLP.build(data)
    weights = Weights(xt.shape[0])
    upper = Reweight(
      name="reweight",
      module=weights,
      optimizer=torch.optim.Adam(weights.parameters(), lr=settings["outer_lr"]),
      config=Config(type="darts", first_order=False),
    )
    lower = Classifier(
      name="classifier",
      module=net,
      optimizer=torch.optim.Adam(net.parameters(), lr=lr),
      config=Config(unroll_steps=K, retain_graph=True),
    )
    engine = Engine(
      config=EngineConfig(train_iters=K * upper_steps, valid_step=10**9),
      problems=[upper, lower],
      dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
    )
    engine.train()
    return engine, upper, lower, weights

  def upper_step(engine, upper, t):
    counter["t"] = t
    for k in range(K):
      counter["k"] = k
      engine.global_step += 1
      engine.train_step()
    return upper.last_loss

  engine, upper, _, _ = build()
  for _ in range(int(settings["warmup"])):  # throwaway warm-up steps
    upper_step(engine, upper, 0)
  engine, upper, lower, weights = build()
  times, cpu, history = [], [], []
  for t in range(upper_steps):
    tic, cpu_tic = time.perf_counter(), time.process_time()
    history.append(upper_step(engine, upper, t))
    times.append(time.perf_counter() - tic)
    cpu.append(time.process_time() - cpu_tic)
  clean, corrupted = torch_common.weight_means(weights.x, data)
  torch_common.emit(
    "betty",
    ("betty-ml",),
    settings,
    {
      "times_s": times,
      "cpu_times_s": cpu,
      "test_acc": torch_common.test_accuracy(lower.forward, data),
      "val_loss_history": history,
      "mean_weight_clean": clean,
      "mean_weight_corrupted": corrupted,
      "adam": "betty DifferentiableAdam" if own_adam else "custom_optimizer_step + eps_root",
    },
  )


if __name__ == "__main__":
  if len(sys.argv) not in (3, 4):
    sys.exit("usage: betty_side.py DATA.npz SETTINGS.json [--betty-adam]")
  main(sys.argv[1], sys.argv[2], own_adam=len(sys.argv) == 4 and sys.argv[3] == "--betty-adam")
