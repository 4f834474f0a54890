"""The BOAT hyper-cleaning benchmark: the suite runs without BOAT, and our
configuration matched to BOAT's formulation does what its notes say."""

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config
from benchmarks import runner
from benchmarks.peers import venv
from benchmarks.suites import hypercleaning_peers as suite
from bilevel_jax.problems import CleaningData, HyperCleaning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "bench", "hypercleaning_peers_small.toml")
FULL = os.path.join(ROOT, "configs", "bench", "hypercleaning_peers.toml")


def test_small_config_skips_missing_boat(tmp_path, monkeypatch):
  pytest.importorskip("mlxtend")
  monkeypatch.setenv("BILEVEL_JAX_PEERS", str(tmp_path / "no_peers"))
  payload = runner.run(SMALL, out_dir=str(tmp_path), quiet=True, plot=False)
  rows = payload["rows"]
  assert {r["impl"] for r in rows} == {"bilevel_jax"}
  assert sorted((r["method"], r["size"]) for r in rows) == sorted(
    (suite.METHODS[m], K) for m in ("bda", "rhg") for K in (5, 10)
  )
  for row in rows:
    assert row["per"] == "upper_iteration" and row["repeats"] == 3
    assert 0 < row["median_s"] and 0 < row["compile_s"]
    assert 0 <= row["metric"] <= 100 and np.isfinite(row["val_loss"])
    assert "speedup" not in row
  status = payload["peer"]["boat"]["status"]
  assert status.startswith("skipped: no virtual environment") and "--setup-peers" in status
  assert any(note.startswith("BOAT: skipped") for note in payload["notes"])
  assert os.path.exists(tmp_path / (runner.result_stem(SMALL) + ".json"))


@pytest.mark.parametrize("path", [SMALL, FULL])
def test_configs_validate(path):
  _, name, cfg = runner.read_config(path)
  assert name == "hypercleaning_peers"
  assert cfg["method"]["methods"] == ["bda", "rhg"]


def test_alpha_init_outside_open_interval_is_rejected():
  with pytest.raises(config.ConfigError, match="alpha_init"):
    config.validate({"method": {"alpha_init": 1.0}}, suite.SCHEMA, "test.toml")


def _tiny_problem():
  rng = np.random.default_rng(3)
  n, m, d, c = 5, 4, 3, 3
  data = CleaningData(
    x_train=jnp.asarray(rng.random((n, d))),
    y_train=jnp.asarray(rng.integers(0, c, n)),
    x_val=jnp.asarray(rng.random((m, d))),
    y_val=jnp.asarray(rng.integers(0, c, m)),
    x_test=jnp.asarray(rng.random((m, d))),
    y_test=jnp.asarray(rng.integers(0, c, m)),
    corrupted=jnp.zeros((n,), bool),
  )
  y0 = {"W": rng.normal(size=(c, d)), "b": rng.normal(size=(c,))}  # (classes, features)
  return HyperCleaning(data, l2=0.0), y0


def _numpy_ce_grad(y, feats, labels, weights):
  """mean_i w_i CE_i(y) and its gradient in (W, b), written out."""
  logits = feats @ y["W"].T + y["b"][None, :]
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  n = labels.size
  onehot = np.eye(p.shape[1])[labels]
  value = np.mean(weights * -np.log(p[np.arange(n), labels]))
  g = weights[:, None] * (p - onehot) / n
  return value, {"W": g.T @ feats, "b": g.sum(axis=0)}


def _boat_lower_loop(x, y0, data, K, lr, alpha_init, decay, gda):
  """BOAT's lower loop: SGD(lr) on alpha_k F + (1 - alpha_k) f, alpha decayed
  geometrically (GDA), or on f alone (NGD). Returns (F(y_K), y_K)."""
  sig = 1 / (1 + np.exp(-x))
  u, v = (np.asarray(a, np.float64) for a in (data.x_train, data.x_val))
  lab_u, lab_v = np.asarray(data.y_train), np.asarray(data.y_val)
  y, alpha = {k: a.copy() for k, a in y0.items()}, alpha_init
  for _ in range(K):
    _, g_f = _numpy_ce_grad(y, u, lab_u, sig)
    _, g_F = _numpy_ce_grad(y, v, lab_v, np.ones(lab_v.size))
    a = alpha if gda else 0.0
    y = {k: y[k] - lr * (a * g_F[k] + (1 - a) * g_f[k]) for k in y}
    alpha *= decay
  return _numpy_ce_grad(y, v, lab_v, np.ones(lab_v.size))[0], y


@pytest.mark.parametrize("method", ["bda", "rhg"])
def test_matched_step_is_boats_update(method):
  problem, y0 = _tiny_problem()
  K, lr, upper_lr, a0, decay, iters = 4, 0.7, 0.05, 0.6, 0.8, 3
  kw = {"lower_lr": lr, "alpha_init": a0, "alpha_decay": decay}
  hypergradient = jax.jit(suite.matched_hypergradient(problem, method, K, **kw))
  step, optimizer = suite.make_step(problem, method, K, upper_lr=upper_lr, **kw)
  step = jax.jit(step)
  loop = lambda x, y: _boat_lower_loop(x, y, problem.data, K, lr, a0, decay, method == "bda")

  x = np.array([0.3, -0.2, 0.0, 0.5, -0.4])
  state = (jnp.asarray(x), optimizer.init(jnp.asarray(x)), jax.tree_util.tree_map(jnp.asarray, y0))
  y, m, v = y0, np.zeros_like(x), np.zeros_like(x)
  for t in range(1, iters + 1):
    value, y_K = loop(x, y)
    eps = 1e-6  # the hypergradient by central differences of the NumPy loop
    grad = np.array(
      [(loop(x + eps * e, y)[0] - loop(x - eps * e, y)[0]) / (2 * eps) for e in np.eye(x.size)]
    )
    ours_value, ours_grad, ours_solution = hypergradient(state[0], state[2])
    ours_y = ours_solution.y
    np.testing.assert_allclose(ours_value, value, rtol=1e-10)
    np.testing.assert_allclose(ours_grad, grad, rtol=1e-6, atol=1e-10)
    # torch.optim.Adam's step (betas 0.9, 0.999, eps 1e-8), then copy_last_param.
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad**2
    x = x - upper_lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    y = y_K
    state = step(*state)[:3]
    np.testing.assert_allclose(state[0], x, rtol=1e-6, atol=1e-9)
    for k in y:
      np.testing.assert_allclose(state[2][k], y[k], rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(ours_y[k], y[k], rtol=1e-9, atol=1e-12)


def test_boat_script_agrees_with_ours(tmp_path):
  """With the BOAT venv present (``--setup-peers`` made it), BOAT and our
  matched configuration give the same losses and accuracy on tiny data."""
  python = venv.python_path("boat")
  if not os.path.exists(python):
    pytest.skip(f"no BOAT virtual environment at {python}")
  rng = np.random.default_rng(0)
  n, m, d, c = 40, 20, 6, 3
  split = CleaningData(
    x_train=rng.random((n, d), np.float32),
    y_train=rng.integers(0, c, n).astype(np.int32),
    x_val=rng.random((m, d), np.float32),
    y_val=rng.integers(0, c, m).astype(np.int32),
    x_test=rng.random((m, d), np.float32),
    y_test=rng.integers(0, c, m).astype(np.int32),
    corrupted=np.zeros((n,), bool),
  )
  y0 = suite.initial_lower(d, c, 0.5, 0)
  data_path = str(tmp_path / "data.npz")
  K, iterations = 4, 3
  batches = suite.batch_stream(n, 8, K * iterations, seed=1)
  suite.write_data(data_path, split, y0, batches)
  cfg = {
    "method": {
      "methods": ["bda", "rhg"],
      "variants": ["full", "minibatch", "adam"],
      "batch_size": 8,
      "adam_lr": 0.05,
      "upper_iterations": iterations,
      "lower_lr": 0.5,
      "upper_lr": 0.1,
      "alpha_init": 0.5,
      "alpha_decay": 0.9,
    },
    "timing": {"warmup": 0},
  }
  try:
    out = suite.run_boat(python, data_path, suite.boat_settings(cfg, K, 1), timeout=120)
  except subprocess.CalledProcessError as err:
    pytest.fail(f"BOAT script failed: {err}")
  problem = HyperCleaning(jax.tree_util.tree_map(jnp.asarray, split), l2=0.0)
  y0 = jax.tree_util.tree_map(jnp.asarray, y0)
  ran = sorted((r["method"], r["variant"]) for r in out["results"])
  assert ran == sorted(suite.pairs(cfg["method"])) and ("bda", "adam") not in ran
  for res in out["results"]:
    variant = res["variant"]
    stream = batches if variant == "minibatch" else None
    ours = suite.run_ours(problem, res["method"], K, y0, cfg, {}, variant, stream)
    if variant == "adam":
      # higher's differentiable Adam adds eps to sqrt(nu) before the bias
      # correction (lr sqrt(1 - b2^k) / (1 - b1^k) m / (sqrt(nu) + eps), the old
      # torch formula); optax (and torch.optim.Adam now) add it after, an eps
      # 1 / sqrt(1 - b2^k) (31x at k = 1) times smaller. The losses agree to
      # about 1e-5; the upper Adam's near-sign steps on x amplify the
      # hypergradient's difference in x_sum, which is not compared.
      np.testing.assert_allclose(ours["val_loss_history"], res["val_loss_history"], rtol=5e-5)
      continue
    np.testing.assert_allclose(ours["val_loss_history"], res["val_loss_history"], rtol=1e-5)
    np.testing.assert_allclose(ours["x_sum"], res["x_sum"], rtol=1e-4, atol=1e-5)
    assert ours["test_acc"] == pytest.approx(res["test_acc"])
  assert out["versions"]["boat-torch"] and out["torch_threads"] == 1


def test_upper_iterations_are_capped_by_lower_steps():
  m = {"upper_iterations": 50, "max_lower_steps": 10000, "min_upper_iterations": 10}
  assert [suite.upper_iterations_at(m, K) for K in (50, 200, 400, 800, 2000)] == [
    50,
    50,
    25,
    12,
    10,
  ]
  assert suite.upper_iterations_at(dict(m, max_lower_steps=0), 800) == 50
