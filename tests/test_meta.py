"""Few-shot episodes, datasets, the meta-learning bilevel model and its experiment."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import bda
from experiments import cli
from bilevel_jax import meta
from bilevel_jax import sharding
from experiments import config
from bilevel_jax._src.meta import episodes as ep
from tests.helpers import finite_difference_grad, tree_allclose

KW = dict(steps=8, upper_lr=0.3, lower_lr=0.4, alpha=0.4)


def _episodes(num_tasks=4, ways=3, shots=2, queries=3, dim=5, seed=0):
  feats, labels = meta.synthetic_classes(
    num_classes=12, per_class=10, dim=dim, latent_dim=2, seed=seed, dtype=np.float64
  )
  return meta.sample_episodes(
    feats,
    labels,
    np.arange(12),
    ways=ways,
    shots=shots,
    queries=queries,
    num_tasks=num_tasks,
    rng=np.random.default_rng(seed),
  )


# ------------------------------------------------------------------ episodes
def test_episodes_shapes_labels_and_disjoint_splits():
  feats, labels = meta.synthetic_classes(num_classes=30, per_class=12, dim=6, latent_dim=3)
  train_cls, test_cls = meta.split_classes(labels, test_classes=10, seed=1)
  assert len(train_cls) == 20 and len(test_cls) == 10 and not set(train_cls) & set(test_cls)
  eps = meta.sample_episodes(
    feats, labels, test_cls, ways=5, shots=2, queries=4, num_tasks=7, rng=np.random.default_rng(0)
  )
  assert eps.x_train.shape == (7, 10, 6) and eps.x_val.shape == (7, 20, 6)
  np.testing.assert_array_equal(eps.y_train[0], np.repeat(np.arange(5), 2))
  np.testing.assert_array_equal(eps.y_val[3], np.repeat(np.arange(5), 4))
  rows = {tuple(r) for r in feats}
  test_rows = {tuple(r) for c in test_cls for r in feats[labels == c]}
  for t in range(7):
    train_rows = {tuple(r) for r in eps.x_train[t]}
    val_rows = {tuple(r) for r in eps.x_val[t]}
    assert train_rows <= test_rows and val_rows <= test_rows <= rows
    assert not train_rows & val_rows  # shots and queries are different samples
    # every query of class k comes from the class of the shots labelled k
    for k in range(5):
      src = {
        labels[np.flatnonzero((feats == r).all(1))[0]] for r in eps.x_train[t][eps.y_train[t] == k]
      }
      dst = {
        labels[np.flatnonzero((feats == r).all(1))[0]] for r in eps.x_val[t][eps.y_val[t] == k]
      }
      assert len(src) == 1 and src == dst


def test_episode_errors_name_the_argument():
  feats, labels = meta.synthetic_classes(num_classes=6, per_class=4, dim=3, latent_dim=1)
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r"`ways` = 7 exceeds the 6 classes"):
    meta.sample_episodes(
      feats, labels, np.arange(6), ways=7, shots=1, queries=1, num_tasks=1, rng=rng
    )
  with pytest.raises(ValueError, match=r"fewer than `shots` \+ `queries` = 5"):
    meta.sample_episodes(
      feats, labels, np.arange(6), ways=2, shots=2, queries=3, num_tasks=1, rng=rng
    )
  with pytest.raises(ValueError, match=r"`shots` must be a positive int"):
    meta.sample_episodes(
      feats, labels, np.arange(6), ways=2, shots=0, queries=3, num_tasks=1, rng=rng
    )
  with pytest.raises(ValueError, match=r"`test_classes` must lie in \[1, 5\]"):
    meta.split_classes(labels, test_classes=6)
  with pytest.raises(ValueError, match=r"`latent_dim` \(3\) must be smaller than `dim` \(3\)"):
    meta.synthetic_classes(dim=3, latent_dim=3)


def test_synthetic_family_is_seeded():
  a = meta.synthetic_classes(num_classes=5, per_class=3, dim=4, latent_dim=2, seed=3)
  b = meta.synthetic_classes(num_classes=5, per_class=3, dim=4, latent_dim=2, seed=3)
  c = meta.synthetic_classes(num_classes=5, per_class=3, dim=4, latent_dim=2, seed=4)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[0], c[0])
  assert a[0].shape == (15, 4) and a[0].dtype == np.float32
  np.testing.assert_array_equal(a[1], np.repeat(np.arange(5), 3))


def test_rotations_make_new_classes():
  images = np.arange(2 * 9, dtype=np.float32).reshape(2, 9)
  feats, labels = ep.rotate_classes(images, np.array([0, 1]), image_shape=(3, 3), rotations=4)
  np.testing.assert_array_equal(labels, [0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_array_equal(feats[2].reshape(3, 3), np.rot90(images[0].reshape(3, 3)))
  with pytest.raises(ValueError, match=r"`rotations` must be 1, 2, 3 or 4"):
    ep.rotate_classes(images, np.array([0, 1]), image_shape=(3, 3), rotations=5)


def test_omniglot_loader_on_a_tiny_folder(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  pixels = {}
  for alphabet in ("Alpha", "Beta"):
    for char in ("character01", "character02"):
      folder = tmp_path / "images_background" / alphabet / char
      folder.mkdir(parents=True)
      for i in range(3):
        img = (rng.random((10, 10)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(img, mode="L").save(folder / f"{i:02d}.png")
        pixels[(alphabet, char, i)] = img
  (tmp_path / "images_background" / "README.txt").write_text("not an image")
  feats, labels, names = meta.load_omniglot(str(tmp_path), image_size=10)
  assert feats.shape == (12, 100) and feats.dtype == np.float32
  np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
  assert names[0] == "images_background/Alpha/character01" and len(names) == 4
  np.testing.assert_allclose(
    feats[4], 1.0 - pixels[("Alpha", "character02", 1)].ravel() / 255.0, atol=1e-6
  )  # inverted: strokes (black) become 1
  small, _, _ = meta.load_omniglot(str(tmp_path), image_size=5, invert=False, max_classes=2)
  assert small.shape == (6, 25) and 0.0 <= small.min() and small.max() <= 1.0
  with pytest.raises(FileNotFoundError, match="does not exist"):
    meta.load_omniglot(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    meta.load_omniglot(str(tmp_path / "empty"))


# --------------------------------------------------------------------- model
def _model(dim=5, dtype=jnp.float64):
  return meta.init_representation(jax.random.PRNGKey(0), [dim, 4, 3], dtype)


def test_per_task_solve_equals_joint_solve_of_the_summed_problem():
  """Section 5.3's f and F are sums over tasks: the vmapped per-task BDA is the
  joint BDA on all heads, and the hypergradients add up."""
  tasks = jax.tree_util.tree_map(jnp.asarray, _episodes(num_tasks=2))
  x, y0 = _model(), meta.init_heads(2, 3, 3, jnp.float64)
  batched = meta.batched_hypergradient(l2=0.01, **KW)
  values, grads, y_k = jax.jit(batched)(x, y0, tasks)
  task = lambda j: jax.tree_util.tree_map(lambda a: a[j], tasks)
  head = lambda y, j: jax.tree_util.tree_map(lambda a: a[j], y)
  joint_upper = lambda x, y: sum(meta.task_upper(x, head(y, j), task(j)) for j in range(2))
  joint_lower = lambda x, y: sum(meta.task_lower(x, head(y, j), task(j), 0.01) for j in range(2))
  joint = jax.jit(
    lambda x, y0: bda.hypergradient(joint_upper, joint_lower, x, y0, return_info=True, **KW)
  )
  value, grad, sol = joint(x, y0)
  np.testing.assert_allclose(jnp.sum(values), value, rtol=1e-12)
  assert tree_allclose(
    jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), grads), grad, rtol=1e-10, atol=1e-12
  )
  assert tree_allclose(y_k, sol.y, rtol=1e-12, atol=1e-13)


def test_batched_hypergradient_reports_each_task_status():
  """return_info=True passes each task's inner status on: a task whose
  support set holds a NaN fails alone, and says so."""
  from bilevel_jax import Status

  tasks = jax.tree_util.tree_map(jnp.asarray, _episodes(num_tasks=2))
  x, y0 = _model(), meta.init_heads(2, 3, 3, jnp.float64)
  checked = jax.jit(meta.batched_hypergradient(l2=0.01, return_info=True, **KW))
  values, _, solution = checked(x, y0, tasks)
  np.testing.assert_array_equal(solution.info.status, [Status.SUCCESS] * 2)
  np.testing.assert_allclose(solution.info.upper_value, values)  # F(x, y_K) of each task
  poisoned = tasks._replace(x_train=tasks.x_train.at[1].set(jnp.nan))
  _, _, failed = checked(x, y0, poisoned)  # same shapes: no second compile
  np.testing.assert_array_equal(failed.info.status, [Status.SUCCESS, Status.NONFINITE])


@pytest.mark.parametrize("alpha", [0.0, 0.4])  # RHG, BDA
def test_task_hypergradient_matches_finite_differences(alpha):
  task = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), _episodes(num_tasks=1))
  x = _model()
  y0 = jax.tree_util.tree_map(lambda a: a[0], meta.init_heads(1, 3, 3, jnp.float64))
  kw = dict(KW, alpha=alpha)
  _, grad, _ = jax.jit(lambda x: meta.task_hypergradient(x, y0, task, l2=0.01, **kw))(x)
  w = x[1]["w"]
  up = lambda a, y: meta.task_upper(a, y, task)
  low = lambda a, y: meta.task_lower(a, y, task, 0.01)

  @jax.jit
  def phi(flat):
    xx = [x[0], {"w": flat.reshape(w.shape), "b": x[1]["b"]}]
    return up(xx, bda.solve(up, low, xx, y0, **kw).y)

  np.testing.assert_allclose(
    grad[1]["w"].ravel(), finite_difference_grad(phi, w.ravel()), rtol=1e-6, atol=1e-9
  )


def test_meta_hypergradient_sharded_over_four_devices(dtype=jnp.float32):
  """float32 here; test_sharding.py covers both dtypes on a cheaper problem."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 CPU host devices (tests/conftest.py)")
  tasks = jax.tree_util.tree_map(
    lambda a: jnp.asarray(a, dtype) if a.dtype.kind == "f" else jnp.asarray(a),
    _episodes(num_tasks=6),
  )
  x, y0 = _model(dtype=dtype), meta.init_heads(6, 3, 3, dtype)
  batched = meta.batched_hypergradient(l2=0.01, **KW)
  # The first call traces twice (the shape check and the program); a second
  # call with new values must not trace again.
  chex.clear_trace_counter()
  fn = sharding.shard_hypergradient(
    chex.assert_max_traces(lambda *a: batched(*a), n=2),
    sharding.make_mesh(4),
    in_axes=(None, 0, 0),
    reduce="sum",
  )
  value, grad, y_k = fn(x, y0, tasks)
  values, grads, y_ref = jax.jit(batched)(x, y0, tasks)
  tol = dict(rtol=2e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-11, atol=1e-13)
  np.testing.assert_allclose(value, jnp.sum(values), **tol)
  assert tree_allclose(grad, jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), grads), **tol)
  assert tree_allclose(y_k, y_ref, **tol)
  assert jax.tree_util.tree_leaves(grad)[0].dtype == dtype
  fn(jax.tree_util.tree_map(lambda a: a * 0.5, x), y0, tasks)  # a retrace would raise


def test_adapted_heads_beat_chance_and_untrained_heads_do_not():
  feats, labels = meta.synthetic_classes(
    num_classes=20, per_class=20, dim=6, latent_dim=3, nuisance=0.0, seed=2, dtype=np.float64
  )
  tasks = jax.tree_util.tree_map(
    jnp.asarray,
    meta.sample_episodes(
      feats,
      labels,
      np.arange(20),
      ways=5,
      shots=5,
      queries=5,
      num_tasks=20,
      rng=np.random.default_rng(0),
    ),
  )
  x = meta.init_representation(jax.random.PRNGKey(1), [6, 16], jnp.float64)
  y0 = meta.init_heads(20, 16, 5, jnp.float64)
  fitted = jax.jit(lambda x: meta.evaluate(x, tasks, y0, steps=50, lower_lr=0.2, l2=1e-3))(x)
  assert fitted.shape == (20,) and float(fitted.mean()) > 0.6
  untrained = meta.accuracy(x, y0, tasks.x_val, tasks.y_val)  # all logits 0: argmax = class 0
  np.testing.assert_allclose(untrained, 0.2)


def test_adapt_on_features_equals_the_solve_on_x():
  """`adapt` runs its K steps on precomputed features: the same heads as the
  unrolled solve whose lower objective recomputes the network every step."""
  from bilevel_jax._src import unrolled

  tasks = jax.tree_util.tree_map(jnp.asarray, _episodes(num_tasks=3))
  x, y0 = _model(), meta.init_heads(3, 3, 3, jnp.float64)
  fitted = jax.jit(lambda x: meta.adapt(x, tasks, y0, steps=6, lower_lr=0.4, l2=0.01))(x)

  @jax.jit
  def reference(x, head0, task):
    low = lambda a, y: meta.task_lower(a, y, task, 0.01)
    return unrolled.solve(low, low, x, head0, steps=6, upper_lr=1.0, lower_lr=0.4, alpha=0.0).y

  ref = jax.vmap(reference, in_axes=(None, 0, 0))(x, y0, tasks)
  assert tree_allclose(fitted, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- MAML
def test_maml_meta_gradient_matches_finite_differences():
  """Second-order MAML: d F_j(theta_K(theta)) / d theta through the K steps,
  Hessian terms included (a first-order MAML gradient fails this check)."""
  task = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), _episodes(num_tasks=1))
  theta = meta.init_maml(_model(), ways=3)
  theta["head"]["w"] = 0.3 * jnp.ones_like(theta["head"]["w"])
  kw = dict(steps=6, lower_lr=0.5, l2=0.01)
  fn = jax.jit(meta.maml_batched_hypergradient(**kw))
  tasks = jax.tree_util.tree_map(lambda a: a[None], task)
  values, grads = fn(theta, tasks)
  np.testing.assert_allclose(values[0], meta.maml_task_loss(theta, task, **kw), rtol=1e-12)
  for path in (("x", 0, "w"), ("head", "w")):
    leaf = theta[path[0]][path[1]][path[2]] if len(path) == 3 else theta["head"]["w"]

    def put(flat, path=path, leaf=leaf):
      new = jax.tree_util.tree_map(lambda a: a, theta)
      if len(path) == 3:
        new["x"] = [dict(layer) for layer in theta["x"]]
        new["x"][path[1]]["w"] = flat.reshape(leaf.shape)
      else:
        new["head"] = {**theta["head"], "w": flat.reshape(leaf.shape)}
      return new

    phi = jax.jit(lambda flat, put=put: meta.maml_task_loss(put(flat), task, **kw))
    g = grads["x"][0]["w"][0] if len(path) == 3 else grads["head"]["w"][0]
    np.testing.assert_allclose(
      g.ravel(), finite_difference_grad(phi, leaf.ravel()), rtol=1e-6, atol=1e-9
    )
  # first-order MAML (the gradient at theta_K, no Hessian terms) is different
  theta_k = meta.maml_adapt(theta, task, **kw)
  first = jax.grad(lambda th: meta.task_upper(th["x"], th["head"], task))(theta_k)
  assert not np.allclose(first["x"][0]["w"], grads["x"][0]["w"][0], rtol=1e-3)


def test_maml_adapts_every_parameter_and_evaluates_the_adapted_model():
  tasks = jax.tree_util.tree_map(jnp.asarray, _episodes(num_tasks=2))
  theta = meta.init_maml(_model(), ways=3)
  kw = dict(steps=4, lower_lr=0.5, l2=0.01)
  acc = jax.jit(lambda th: meta.maml_evaluate(th, tasks, **kw))(theta)

  @jax.jit
  def by_hand(th, task):  # plain gradient descent on f_j over (x, head), unrolled
    for _ in range(4):
      g = jax.grad(lambda t: meta.task_lower(t["x"], t["head"], task, 0.01))(th)
      th = jax.tree_util.tree_map(lambda p, d: p - 0.5 * d, th, g)
    return th, meta.maml_adapt(theta, task, **kw)

  for j in range(2):
    task = jax.tree_util.tree_map(lambda a: a[j], tasks)
    th, adapted = by_hand(theta, task)
    assert tree_allclose(adapted, th, rtol=1e-12, atol=1e-14)
    assert not np.allclose(th["x"][0]["w"], theta["x"][0]["w"])  # x adapts (not ANIL)
    expected = meta.accuracy(
      th["x"],
      jax.tree_util.tree_map(lambda a: a[None], th["head"]),
      task.x_val[None],
      task.y_val[None],
    )[0]
    np.testing.assert_allclose(acc[j], expected)


def test_init_representation_checks_sizes():
  with pytest.raises(ValueError, match=r"`sizes` must list at least two positive widths"):
    meta.init_representation(jax.random.PRNGKey(0), [5])


# ---------------------------------------------------------------- experiment
TINY = """
experiment = "fewshot"
[data]
dataset = "synthetic"
test_classes = 6
ways = [3]
shots = [1]
queries = 2
[synthetic]
num_classes = 15
per_class = 6
dim = 6
latent_dim = 2
[model]
hidden = [8]
[lower]
K = 4
truncate = 2
methods = ["trhg", "bda"]
[upper]
steps = 4
tasks_per_step = 4
[eval]
every = 2
monitor_episodes = 4
test_episodes = 8
target_accuracy = [0.0]
"""


def test_fewshot_experiment_runs_from_the_cli(tmp_path, capsys):
  path = tmp_path / "fs.toml"
  path.write_text(TINY)
  assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet", "--no-plot"]) == 0
  capsys.readouterr()
  payload = json.loads((tmp_path / "out" / "results.json").read_text())
  rows = payload["rows"]
  assert [r["method"] for r in rows] == ["no meta-training (x0)", "T-RHG", "BDA"]
  assert all(0 <= r["test_acc"] <= 100 for r in rows)
  assert [r["seed_iters"] for r in rows[1:]] == [[0], [0]]  # target 0: reached by x0
  assert rows[1]["iters"] == "0 ± 0 (1/1)" and rows[1]["se"] == 0.0  # one seed: no spread
  assert rows[1]["paper_acc"] == "-"  # Table 3 is 5-way: no paper number for 3-way
  hist = payload["histories"]["BDA 3-way 1-shot"]
  assert len(hist["value"]) == 4 and hist["eval_step"] == [0, 2, 4]
  assert np.shape(hist["monitor_acc"]) == (3, 1)  # (evaluations, seeds)
  assert payload["summary"]["w3s1"]["BDA"]["test_acc"] == rows[2]["test_acc"]
  assert payload["paired_table"] == []  # no RHG run: no differences to RHG


@pytest.mark.extended  # two experiment runs (~18 s on 2 cores); CI runs -m extended
def test_vmapped_seeds_are_independent_runs(tmp_path, capsys):
  """[data] seeds = 2 runs both seeds in one vmapped program on a stacked x:
  seed 1's numbers equal those of a run with seed = 1 alone (Adam acts
  coordinatewise), for an RHG-type method and for MAML; the relative target
  lies between the untrained and the lowest final monitor accuracy."""
  body = TINY.replace('methods = ["trhg", "bda"]', 'methods = ["rhg", "maml"]')
  body = body.replace("target_accuracy = [0.0]", 'target_rule = "relative"')
  results = {}
  for name, data in [("both", "seeds = 2"), ("one", "seed = 1")]:
    path = tmp_path / f"{name}.toml"
    path.write_text(body.replace("queries = 2\n", f"queries = 2\n{data}\n"))
    out = tmp_path / name
    assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--no-plot"]) == 0
    results[name] = json.loads((out / "results.json").read_text())
  capsys.readouterr()
  for both, one in zip(results["both"]["rows"], results["one"]["rows"]):
    assert both["method"] == one["method"] and both["seeds"] == 2 and one["seeds"] == 1
    np.testing.assert_allclose(both["seed_acc"][1], one["seed_acc"][0], atol=0.011)
  for method in ("RHG", "MAML"):
    h2 = np.asarray(results["both"]["histories"][f"{method} 3-way 1-shot"]["monitor_acc"])
    h1 = np.asarray(results["one"]["histories"][f"{method} 3-way 1-shot"]["monitor_acc"])
    np.testing.assert_allclose(h2[:, 1], h1[:, 0], atol=1e-5)
  summary = results["both"]["summary"]["w3s1"]
  lowest = min(summary[m]["monitor_acc_final"] for m in ("RHG", "MAML"))
  base = summary["baseline"]["monitor_acc_x0"]
  np.testing.assert_allclose(summary["RHG"]["target"], base + 0.9 * (lowest - base), rtol=1e-9)
  np.testing.assert_allclose(summary["RHG"]["monitor_acc_start"], base, rtol=1e-6)  # same x0
  diff = np.subtract(summary["MAML"]["seed_acc"], summary["RHG"]["seed_acc"])
  expected = f"{diff.mean():.2f} ± {diff.std(ddof=1) / np.sqrt(2):.2f}"
  assert results["both"]["paired_table"][0]["MAML - RHG acc"] == expected


@pytest.mark.parametrize(
  "body, match",
  [
    (TINY.replace("[0.0]", "[0.5, 0.6]"), r"`target_accuracy` needs one entry per entry"),
    (TINY.replace("[0.0]", "[1.5]"), r"`target_accuracy` = \[1.5\] must lie in"),
    (TINY.replace('dataset = "synthetic"', 'dataset = "omniglot"'), r"needs \[data\] `path`"),
    (TINY.replace("queries = 2", "queries = 2\nrotations = 4"), r"`rotations` applies to image"),
  ],
)
def test_fewshot_config_errors(tmp_path, body, match):
  path = tmp_path / "bad.toml"
  path.write_text(body)
  with pytest.raises(config.ConfigError, match=match):
    module, _, cfg = cli.load_experiment_config(str(path))
    module.run(cfg, quiet=True)


def test_fewshot_experiment_with_an_adam_inner_loop(tmp_path, capsys):
  """[lower] optimizer = "adam": the tasks' heads are fitted by Adam
  (`lower_optimizer`) inside the unrolled loop, and upper.optimize draws a new
  meta-batch of episodes every step."""
  path = tmp_path / "fs_adam.toml"
  path.write_text(TINY.replace("[lower]\n", '[lower]\noptimizer = "adam"\nadam_lr = 0.05\n'))
  assert cli.main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet", "--no-plot"]) == 0
  capsys.readouterr()
  payload = json.loads((tmp_path / "out" / "results.json").read_text())
  assert payload["settings"]["lower"]["optimizer"] == "adam"
  hist = payload["histories"]["BDA 3-way 1-shot"]
  assert len(hist["value"]) == 4 and all(np.isfinite(hist["value"]))
