"""Data poisoning (6.3) of Solla & Royset: the lower level as the paper writes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import composite
from bilevel_jax._src.problems import regression
from bilevel_jax._src.status import Status
from tests.helpers import finite_difference_grad

LAM = (float(np.exp(3.0)), float(np.exp(2.0)))  # the paper's lambda_1, lambda_2
ALPHA, BETA = 0.01, 0.01  # the paper's alpha^0 = beta^0


def _data():
  data = regression.make_instances(0, 1, dim=8, n_train=12, n_val=10, n_test=10)
  return jax.tree_util.tree_map(lambda leaf: leaf[0], data)


def _hand_built(data, w, smoothing):
  """y of (3.1) for (6.3) written out by hand: h(y, -y) = lambda_1 |y|_1 has
  e_alpha h(y, -y) = lambda_1 sum_i e_a(|.|-pair)(y_i) with a = ``smoothing``
  (alpha lambda_1 for h = lambda_1 sum max, as the paper writes it):
  phi(t) = |t| - a/2 for |t| >= a/2, t^2/a - a/4 otherwise.  Solved by damped
  Newton on the piecewise quadratic objective; returns (y, d val_error / dw).
  """
  a_tr, b, a_val, b_val = (
    np.asarray(v) for v in (data.a_train, data.b_train, data.a_val, data.b_val)
  )
  l1, l2 = LAM
  target = b + np.asarray(w)
  tau = smoothing / 2

  def phi(t):
    return np.where(np.abs(t) >= tau, np.abs(t) - smoothing / 2, t**2 / smoothing - smoothing / 4)

  def obj(y):
    r = a_tr @ y - target
    return r @ r + 0.5 * (l2 + BETA) * y @ y + l1 * np.sum(phi(y))

  def grad_hess(y):
    dphi = np.where(np.abs(y) >= tau, np.sign(y), 2 * y / smoothing)
    d2 = np.where(np.abs(y) >= tau, 0.0, 2 / smoothing)
    grad = 2 * a_tr.T @ (a_tr @ y - target) + (l2 + BETA) * y + l1 * dphi
    hess = 2 * a_tr.T @ a_tr + (l2 + BETA) * np.eye(y.size) + l1 * np.diag(d2)
    return grad, hess

  y = np.zeros(a_tr.shape[1])
  for _ in range(100):
    grad, hess = grad_hess(y)
    if np.linalg.norm(grad) < 1e-12:
      break
    step = np.linalg.solve(hess, -grad)
    t = 1.0
    while obj(y + t * step) > obj(y) + 1e-4 * t * grad @ step and t > 1e-10:
      t *= 0.5
    y = y + t * step
  _, hess = grad_hess(y)
  df_dy = 2 * a_val.T @ (a_val @ y - b_val) / b_val.size
  # dy/dw = 2 H^{-1} A^T (from grad_y g = 2 A^T (A y - b - w) + ...)
  return y, 2 * a_tr @ np.linalg.solve(hess, df_dy)


def _library(data, reformulated=False):
  low = regression.elastic_net_lower(data, reformulated, lam=LAM)

  @jax.jit
  def val_error(w):
    sol = composite.solve(low.g, low.G, low.h, w, low.y0, alpha=ALPHA, beta=BETA)
    return regression.mse(data.a_val, data.b_val, low.to_model(sol.y)), sol

  return val_error


def test_poisoning_lower_level_puts_lambda1_in_h():
  # (6.3): g = |A y - b - w|^2 + lambda_2/2 |y|^2, G = (y, -y),
  # h = lambda_1 sum max: at alpha > 0 the smoothed solution is that of
  # e_alpha h = lambda_1 e_{alpha lambda_1} h_1, not lambda_1 e_{alpha/lambda_1}
  # h_1 (lambda_1 in G).  Solution and hypergradient against the hand-built
  # problem, at w = 0 (where the two differ the most) and at a w on the sphere
  # |w|^2 = c; the other placement must be told apart.
  data = _data()
  val_error = _library(data)
  grad = jax.jit(jax.grad(lambda w: val_error(w)[0]))
  n = data.b_train.shape[0]
  for w in (np.zeros(n), 10.0 * np.cos(np.arange(n)) / np.linalg.norm(np.cos(np.arange(n)))):
    value, sol = val_error(jnp.asarray(w))
    assert int(sol.info.status) == Status.SUCCESS
    y_paper, g_paper = _hand_built(data, w, ALPHA * LAM[0])
    y_other, g_other = _hand_built(data, w, ALPHA / LAM[0])
    np.testing.assert_allclose(sol.y, y_paper, atol=1e-8)
    np.testing.assert_allclose(grad(jnp.asarray(w)), g_paper, rtol=1e-6, atol=1e-10)
    # the test tells the two placements apart
    assert np.linalg.norm(g_other - g_paper) > 0.05 * np.linalg.norm(g_paper)


def test_poisoning_hypergradient_matches_finite_differences():
  # At the paper's alpha = beta = 0.01 and a w with nonzero coefficients,
  # for "2" and "2R" (the reformulation has the same Y_{alpha,beta} up to
  # its own beta term); and the 2R model equals the 2 model at alpha = 0+.
  data = _data()
  n = data.b_train.shape[0]
  w = jnp.asarray(10.0 * np.sin(np.arange(n) + 1.0) / np.linalg.norm(np.sin(np.arange(n) + 1.0)))
  for reformulated in (False, True):
    val_error = _library(data, reformulated)
    analytic = jax.grad(lambda ww: val_error(ww)[0])(w)
    numeric = finite_difference_grad(lambda ww: val_error(ww)[0], w, eps=1e-5)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("reformulated", [False, True])
def test_poisoning_lambda_must_be_concrete_for_folding(reformulated):
  # lambda_1 is folded into h's slopes (concrete), so h carries no traced scale
  low = regression.elastic_net_lower(_data(), reformulated, lam=LAM)
  assert getattr(low.h, "scale", None) is None


def test_timed_instances_times_each_instance_of_one_program():
  # The per-instance clock of the Table 2 runs: outputs as a plain lax.map
  # (the zero added by the start stamp changes nothing), one positive time
  # per instance, inside the program's run time.  (No timing comparisons.)
  from experiments import poisoning

  data = regression.make_instances(0, 3, dim=4, n_train=6, n_val=3, n_test=3)
  trips = jnp.array([1, 5, 50])

  def fn(d, k):
    def body(i, y):
      return jnp.sin(y) + d.a_train @ d.a_train.T @ y * 1e-3

    y = jax.lax.fori_loop(0, k, body, d.b_train)
    return {"y": y, "k": k}

  out, compile_s, run_s, times = poisoning.timed_instances(fn, data, trips)
  expected = jax.lax.map(lambda args: fn(*args), (data, trips))
  np.testing.assert_allclose(out["y"], expected["y"], rtol=1e-12)
  assert times.shape == (3,) and np.all(times > 0) and compile_s > 0
  assert np.sum(times) <= run_s


def test_spread_and_gap_to_the_paper():
  from experiments import composite_common as cc
  from experiments import poisoning

  s = cc.spread([1.0, 2.0, 3.0, 6.0])
  gap = poisoning._gap(s, 3.0 + 1.5 * s["se"])
  assert gap["inside_2se"] and np.isclose(gap["gap_in_se"], -1.5)
  assert not poisoning._gap(s, 3.0 + 2.5 * s["se"])["inside_2se"]


@pytest.mark.slow
def test_poisoning_tiny_config_runs(tmp_path):
  # The experiment end to end on configs/poisoning_tiny.toml (2 instances,
  # 10 iterations): every instance has a time, the summaries have their
  # spreads, and nothing is reported as reduced.
  import json
  import os

  from experiments import cli

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "tiny"
  config = os.path.join(repo, "configs", "poisoning_tiny.toml")
  assert cli.main(["run", config, "--out", str(out), "--quiet", "--no-plot"]) == 0
  payload = json.loads((out / "results.json").read_text())
  summary = payload["summary"]
  assert set(summary) == {"clean", "2", "2R", "random"}
  for method in ("2", "2R", "random"):
    assert summary[method]["n"] == 2 and len(payload["histories"][method]["time_s"]) == 2
    assert summary[method]["time_s"]["min"] > 0
  assert len(payload["histories"]["random"]["val_error"]) == 2
  assert payload["reductions"] == []
