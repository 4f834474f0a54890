"""Adversarial inputs to `upper.optimize` and its checkpoints: every wrong
argument is an error that names it, no wrong answer is reported as SUCCESS,
and a checkpoint survives Ctrl-C and SIGKILL."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax
from bilevel_jax import upper
from bilevel_jax._src import checkpointing
from bilevel_jax._src import upper_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hg(x, y):
  """phi(x) = ||x - 1||^2 / 2 with the lower solution y = x (like y0)."""
  return 0.5 * jnp.sum((x - 1.0) ** 2), x - 1.0, x


def _run(hg=_hg, x0=None, steps=3, **kw):
  kw.setdefault("y0", jnp.zeros(3))
  x0 = jnp.zeros(3) if x0 is None else x0
  return upper.optimize(hg, x0, optax.sgd(0.5), steps=steps, **kw)


# ------------------------------------------------------------- hypergradient_fn
def test_hypergradient_fn_of_one_argument_given_y0():
  with pytest.raises(
    TypeError,
    match=r"`hypergradient_fn` failed when called as "
    r"hypergradient_fn\(x0, y0\).*positional argument",
  ):
    _run(lambda x: (jnp.sum(x), x))


def test_hypergradient_fn_of_two_arguments_without_y0():
  with pytest.raises(TypeError, match=r"hypergradient_fn\(x0\) \(no `y0` given\)"):
    _run(_hg, y0=None)


def test_hypergradient_fn_returning_an_array():
  with pytest.raises(TypeError, match=r"`hypergradient_fn` must return \(value, grad\)"):
    _run(lambda x, y: x)


def test_hypergradient_fn_returning_four_outputs():
  with pytest.raises(TypeError, match="of length 4"):
    _run(lambda x, y: (jnp.sum(x), x, y, y))


def test_hypergradient_fn_returning_two_outputs_with_y0():
  with pytest.raises(TypeError, match=r"with `y0`.*must return \(value, grad, solution\)"):
    _run(lambda x, y: (jnp.sum(x), x))


def test_hypergradient_fn_returning_a_namedtuple():
  from bilevel_jax import bda

  solve = lambda x, y: bda.solve(
    lambda x, y: jnp.sum(y**2),
    lambda x, y: jnp.sum((y - x) ** 2),
    x,
    y,
    steps=2,
    upper_lr=0.1,
    lower_lr=0.1,
    alpha=0.0,
  )
  with pytest.raises(TypeError, match="NamedTuple; pass a method's `make_hypergradient"):
    _run(solve)


def test_scalar_gradient_for_vector_x_is_not_broadcast():
  with pytest.raises(
    ValueError,
    match=r"second output \(the gradient in x\) has a leaf "
    r"\(0\) of shape \(\), expected \(3,\) \(no broadcasting\)",
  ):
    _run(lambda x, y: (jnp.sum(x), jnp.sum(x), y))


def test_gradient_of_another_structure():
  with pytest.raises(TypeError, match="second output .* tree structure"):
    _run(lambda x, y: (jnp.sum(x), (x, x), y))


def test_gradient_of_another_dtype_is_not_cast():
  with pytest.raises(
    TypeError,
    match=r"gradient in x\) has a leaf \(0\) of dtype float32, "
    r"expected float64 \(no silent cast\)",
  ):
    _run(lambda x, y: (jnp.sum(x), x.astype(jnp.float32), y))


def test_vector_value():
  with pytest.raises(
    ValueError,
    match=r"first output \(the value phi\(x\)\) must be a "
    r"scalar, got shape \(3,\)",
  ):
    _run(lambda x, y: (x, x, y))


def test_integer_value():
  with pytest.raises(TypeError, match="first output .* got dtype int"):
    _run(lambda x, y: (jnp.sum(x).astype(int), x, y))


def test_lower_solution_unlike_y0():
  with pytest.raises(ValueError, match="lower solution y .* like `y0`, has a leaf"):
    _run(lambda x, y: (jnp.sum(x), x, jnp.zeros(4)))


def test_vector_lower_status():
  from typing import NamedTuple

  class Info(NamedTuple):
    status: jnp.ndarray

  class Sol(NamedTuple):
    y: jnp.ndarray
    info: Info

  hg = lambda x, y: (jnp.sum(x), x, Sol(y, Info(jnp.zeros(2, jnp.int32))))
  with pytest.raises(
    ValueError,
    match=r"`hypergradient_fn`: `solution.info.status` must be "
    r"a scalar, got shape \(2,\)",
  ):
    _run(hg)


def test_error_raised_inside_hypergradient_fn_keeps_its_kind_and_is_named():
  def hg(x, y):
    raise ValueError("`upper_lr` must be > 0")

  with pytest.raises(ValueError, match=r"`hypergradient_fn` failed .*`upper_lr` must be > 0"):
    _run(hg)


# ------------------------------------------------------------------ metrics_fn
def test_metrics_fn_returning_a_list():
  with pytest.raises(TypeError, match="`metrics_fn` must return a dict of named scalars, got list"):
    _run(metrics_fn=lambda x, y: [jnp.sum(x)])


def test_metrics_fn_returning_a_vector():
  with pytest.raises(
    ValueError,
    match=r"`metrics_fn`: entry 'err' must be a scalar, "
    r"got shape \(3,\)",
  ):
    _run(metrics_fn=lambda x, y: {"err": x})


def test_metrics_fn_overwriting_the_value():
  with pytest.raises(ValueError, match="`metrics_fn` returned the key 'value'"):
    _run(metrics_fn=lambda x, y: {"value": jnp.sum(x)})


def test_metrics_fn_of_wrong_arity():
  with pytest.raises(
    TypeError,
    match=r"`metrics_fn` failed when called as "
    r"metrics_fn\(x0, y\)",
  ):
    _run(metrics_fn=lambda x: {"m": jnp.sum(x)})


def test_metrics_fn_not_callable():
  with pytest.raises(TypeError, match="`metrics_fn` must be callable"):
    _run(metrics_fn={"m": 1.0})


# ------------------------------------------------------------------ projection
def test_projection_changing_the_structure():
  with pytest.raises(TypeError, match="`projection` must return x with the structure of `x0`"):
    _run(projection=lambda x: (x, x))


def test_projection_changing_the_shape():
  with pytest.raises(
    ValueError,
    match=r"`projection`: its output has a leaf \(0\) of "
    r"shape \(2,\)",
  ):
    _run(projection=lambda x: x[:2])


def test_projection_not_callable():
  with pytest.raises(TypeError, match="`projection` must be callable"):
    _run(projection=(0.0, 1.0))


# ------------------------------------------------------------- other arguments
def test_log_every_as_a_string():
  with pytest.raises(TypeError, match="`log_every` must be an int >= 0"):
    _run(log_every="5")


def test_negative_log_every():
  with pytest.raises(ValueError, match="`log_every` must be >= 0"):
    _run(log_every=-1)


def test_resume_as_a_string():
  with pytest.raises(TypeError, match="`resume` must be a bool"):
    _run(resume="no")


def test_float_steps():
  with pytest.raises(TypeError, match="`steps` must be a positive Python int"):
    _run(steps=10.0)


def test_steps_beyond_int32_refused_up_front():
  calls = []
  with pytest.raises(ValueError, match=r"`steps`.*2147483647.*optax's step counters"):
    _run(lambda x, y: (calls.append(1), _hg(x, y))[1], steps=2**31)
  assert not calls  # refused before anything was traced, compiled or allocated


def test_steps_whose_history_exceeds_the_memory_refused(monkeypatch):
  monkeypatch.setattr(upper_loop, "_physical_memory", lambda: 2**30)
  with pytest.raises(
    ValueError,
    match=r"`steps` = 100000000 needs 2.2 GiB for the history "
    r"\(3 entries of 8 bytes per step\), more than this machine's 1.0 GiB",
  ):
    _run(steps=10**8)


def test_history_grows_in_chunks_past_one_chunk(monkeypatch):
  monkeypatch.setattr(upper_loop._History, "CHUNK", 4)
  res = _run(steps=10, metrics_fn=lambda x, y: {"m": jnp.sum(x)})
  assert {k: v.shape for k, v in res.history.items()} == {
    "value": (10,),
    "grad_norm": (10,),
    "m": (10,),
    "step_time": (10,),
  }
  np.testing.assert_allclose(res.history["value"], 1.5 * 0.25 ** np.arange(10), rtol=1e-12)


# ------------------------------------------------------ checkpoint path checks
def test_checkpoint_path_that_is_a_folder(tmp_path):
  with pytest.raises(ValueError, match="`checkpoint_path` = .* is a folder"):
    _run(checkpoint_path=str(tmp_path))


def test_checkpoint_path_under_a_regular_file(tmp_path):
  (tmp_path / "file").write_text("x")
  calls = []
  with pytest.raises(
    ValueError,
    match="`checkpoint_path` = .*file/run.npz' cannot be written .* before the first step",
  ):
    _run(
      lambda x, y: (calls.append(1), _hg(x, y))[1],
      checkpoint_path=str(tmp_path / "file" / "run.npz"),
    )
  assert len(calls) <= 1  # at most the abstract check: no step ran


def test_checkpoint_path_in_a_read_only_folder(tmp_path):
  if os.geteuid() == 0:  # root writes anywhere but in /proc
    if not os.path.isdir("/proc/self"):
      pytest.skip("running as root without /proc")
    path = "/proc/bilevel_jax_run.npz"
  else:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    path = str(folder / "run.npz")
  with pytest.raises(ValueError, match="`checkpoint_path` = .* cannot be written"):
    _run(checkpoint_path=path)


def test_checkpoint_path_of_wrong_type():
  with pytest.raises(TypeError, match="`checkpoint_path` must be a path"):
    _run(checkpoint_path=3)


# ------------------------------------------------------ unusable checkpoint files
def _saved(tmp_path, **kw):
  path = str(tmp_path / "run.npz")
  _run(checkpoint_path=path, **kw)
  return path


def _rewrite(path, drop=(), **replace):
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files if k not in drop}
  arrays.update({k.replace("__", "/").replace("_dot_", "."): v for k, v in replace.items()})
  with open(path, "wb") as handle:
    np.savez(handle, **arrays)


def _write(path, raw):
  with open(path, "wb") as handle:
    handle.write(raw)


def _rejected(path, match, **kw):
  with pytest.raises(
    bilevel_jax.CheckpointError, match=f"{path}' is not a checkpoint of this run: {match}"
  ):
    _run(checkpoint_path=path, **kw)


def test_empty_checkpoint(tmp_path):
  path = str(tmp_path / "run.npz")
  open(path, "wb").close()
  _rejected(path, "the file is empty")


def test_truncated_checkpoint(tmp_path):
  path = _saved(tmp_path)
  with open(path, "rb") as handle:
    raw = handle.read()
  _write(path, raw[: len(raw) // 2])
  _rejected(path, "it is not a complete .npz archive")


def test_checkpoint_of_random_bytes(tmp_path):
  path = str(tmp_path / "run.npz")
  _write(path, np.random.default_rng(0).bytes(1000))
  _rejected(path, r"it is not an .npz archive \(it begins with")


def test_checkpoint_that_is_a_zip_but_not_npz(tmp_path):
  path = str(tmp_path / "run.npz")
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("notes.txt", "hello")
  _rejected(path, "it has no step count")


def test_foreign_npz_checkpoint(tmp_path):
  path = str(tmp_path / "run.npz")
  np.savez(path, weights=np.zeros(3))
  _rejected(path, r"it has no step count \(`meta/step`\); it was not written by")


def test_npy_file_as_checkpoint(tmp_path):
  path = str(tmp_path / "run.npz")
  with open(path, "wb") as handle:
    np.save(handle, np.zeros(3))
  _rejected(path, "it holds a single .npy array")


def test_pickle_file_as_checkpoint(tmp_path):
  path = str(tmp_path / "run.npz")
  with open(path, "wb") as handle:
    pickle.dump({"x": np.zeros(3)}, handle)
  _rejected(path, "it holds pickled Python objects")


def test_checkpoint_missing_its_step(tmp_path):
  path = _saved(tmp_path)
  _rewrite(path, drop=("meta/step",))
  _rejected(path, "it has no step count")


def test_checkpoint_with_negative_step(tmp_path):
  path = _saved(tmp_path)
  _rewrite(path, meta__step=np.int64(-5))
  _rejected(path, r"its step count is negative \(-5\)")


def test_checkpoint_with_float_step(tmp_path):
  path = _saved(tmp_path)
  _rewrite(path, meta__step=np.float64(2.0))
  _rejected(path, "its step count is not an integer scalar")


def test_float64_checkpoint_into_float32_run(tmp_path):
  path = _saved(tmp_path)
  _rejected(
    path,
    r"leaf 0 of `x` has dtype float64 in the file, float32 in this run "
    r"\(no silent cast",
    x0=jnp.zeros(3, jnp.float32),
    y0=jnp.zeros(3, jnp.float32),
  )


def test_checkpoint_of_another_shape(tmp_path):
  path = _saved(tmp_path)
  _rejected(
    path,
    r"leaf 0 of `x` has shape \(3,\) in the file, \(4,\) in this run",
    x0=jnp.zeros(4),
    y0=jnp.zeros(4),
  )


def test_checkpoint_with_short_history(tmp_path):
  path = _saved(tmp_path)
  with np.load(path) as data:
    short = data["meta/history.value"][:-1]
  _rewrite(path, meta__history_dot_value=short)
  _rejected(path, r"its history 'value' has shape \(2,\)")


def test_checkpoint_of_a_run_with_other_metrics(tmp_path):
  path = _saved(tmp_path)
  _rejected(
    path,
    r"its history records .* this run records .*'m'",
    metrics_fn=lambda x, y: {"m": jnp.sum(x)},
    steps=4,
  )


def test_checkpoint_of_another_format(tmp_path):
  path = _saved(tmp_path)
  _rewrite(path, meta__format=np.asarray("something else v9"))
  _rejected(path, "it was written by 'something else v9'")


def test_good_checkpoint_still_resumes(tmp_path):
  path = _saved(tmp_path)
  res = _run(checkpoint_path=path, steps=5)
  assert res.info.resumed_from == 3 and res.history["value"].shape == (5,)
  np.testing.assert_allclose(res.x, 1 - 0.5**5, rtol=1e-12)


# --------------------------------------------------- temporary files and signals
def _temporaries(path):
  folder, name = os.path.split(path)
  return sorted(f for f in os.listdir(folder) if f.startswith(name + ".tmp"))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_stale_temporary_of_a_dead_process_is_removed(tmp_path):
  path = str(tmp_path / "run.npz")
  stale = f"{path}.tmp-{_dead_pid()}"
  live = f"{path}.tmp-{os.getppid()}"  # a running process's: left alone
  for name in (stale, live):
    _write(name, b"partial")
  _run(checkpoint_path=path)
  assert not os.path.exists(stale) and os.path.exists(live)


def test_signal_inside_a_save_is_delivered_after_it(tmp_path, monkeypatch):
  """Ctrl-C inside np.savez: the file is written whole, then KeyboardInterrupt."""
  path = str(tmp_path / "ck.npz")
  real_savez = np.savez

  def savez_interrupted(handle, **arrays):
    os.kill(os.getpid(), signal.SIGINT)  # lands while the archive is written
    time.sleep(0.01)
    real_savez(handle, **arrays)

  monkeypatch.setattr(checkpointing.np, "savez", savez_interrupted)
  before = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    checkpointing.save(path, {"x": jnp.arange(3.0)}, {"step": np.int64(7)})
  assert signal.getsignal(signal.SIGINT) is before
  monkeypatch.setattr(checkpointing.np, "savez", real_savez)
  trees, meta = checkpointing.load(path, {"x": jnp.zeros(3)})
  assert meta["step"] == 7 and _temporaries(path) == []
  np.testing.assert_array_equal(trees["x"], [0.0, 1.0, 2.0])


def test_sigterm_inside_a_save_reaches_its_handler_after_the_file_is_in_place(
  tmp_path, monkeypatch
):
  path = str(tmp_path / "ck.npz")
  real_savez, seen = np.savez, []
  monkeypatch.setattr(
    checkpointing.np,
    "savez",
    lambda handle, **arrays: (os.kill(os.getpid(), signal.SIGTERM), real_savez(handle, **arrays)),
  )
  handler = lambda signum, frame: seen.append((signum, os.path.exists(path), _temporaries(path)))
  previous = signal.signal(signal.SIGTERM, handler)
  try:
    checkpointing.save(path, {"x": jnp.zeros(2)}, {"step": np.int64(1)})
    assert signal.getsignal(signal.SIGTERM) is handler
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert seen == [(signal.SIGTERM, True, [])]


def test_ctrl_c_inside_a_periodic_save_ends_with_a_resumable_checkpoint(tmp_path, monkeypatch):
  path = str(tmp_path / "run.npz")
  real_savez, calls = np.savez, []

  def savez(handle, **arrays):
    calls.append(1)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGINT)
    real_savez(handle, **arrays)

  monkeypatch.setattr(checkpointing.np, "savez", savez)
  with pytest.raises(KeyboardInterrupt):
    _run(steps=6, checkpoint_path=path, checkpoint_every=2)
  monkeypatch.setattr(checkpointing.np, "savez", real_savez)
  assert len(calls) == 2 and _temporaries(path) == []  # periodic save, then the final one
  res = _run(steps=6, checkpoint_path=path, checkpoint_every=2)
  assert res.info.resumed_from == 2
  np.testing.assert_allclose(res.x, 1 - 0.5**6, rtol=1e-12)
  np.testing.assert_allclose(res.history["value"], 1.5 * 0.25 ** np.arange(6), rtol=1e-12)


_SAVER = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np
    from bilevel_jax._src import checkpointing
    path, mode = sys.argv[1], sys.argv[2]
    x = np.arange(200_000.0)
    if mode == "hang":           # SIGKILL lands inside the write, deterministically
      def savez(handle, **arrays):
        handle.write(b"PK partial")
        handle.flush()
        print("inside", flush=True)
        time.sleep(60)
      checkpointing.np.savez = savez
    print("ready", flush=True)
    step = 0
    while True:
      try:
        while True:
          step += 1
          checkpointing.save(path, {"x": x + step}, {"step": np.int64(step)})
      except KeyboardInterrupt:
        print("interrupted", step, flush=True)
        if sys.stdin.readline().strip() != "go":
          break
        print("resumed", flush=True)
""")


def _saver(path, mode):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, "-c", _SAVER, path, mode],
    env=env,
    cwd=ROOT,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  line = proc.stdout.readline().strip()
  assert line == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
  return proc


def _check_saved(path):
  trees, meta = checkpointing.load(path, {"x": np.zeros(200_000)})
  np.testing.assert_array_equal(trees["x"], np.arange(200_000.0) + meta["step"])
  return meta["step"]


def test_sigint_at_random_times_leaves_a_valid_checkpoint(tmp_path):
  """One process saves ~2 MB archives in a loop; SIGINT at random moments (6
  trials) must leave a complete checkpoint of the last or the current step,
  no temporary file, and a KeyboardInterrupt (never "Can't close the ZIP")."""
  rng = np.random.default_rng(0)
  path = str(tmp_path / "ck.npz")
  proc = _saver(path, "loop")
  try:
    while not os.path.exists(path):
      time.sleep(0.005)
    for trial in range(6):
      time.sleep(rng.uniform(0.0, 0.2))
      proc.send_signal(signal.SIGINT)
      line = proc.stdout.readline().split()
      assert line[:1] == ["interrupted"], (line, proc.stderr.read())
      assert _check_saved(path) in (int(line[1]) - 1, int(line[1]))
      assert _temporaries(path) == []
      proc.stdin.write("go\n" if trial < 5 else "quit\n")
      proc.stdin.flush()
      if trial < 5:  # no SIGINT while it still reads "go"
        assert proc.stdout.readline().strip() == "resumed"
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0 and "Error" not in err, err


def test_sigkill_inside_a_save_leaves_a_temporary_the_next_run_removes(tmp_path):
  path = str(tmp_path / "run.npz")
  _run(steps=2, checkpoint_path=path)
  proc = _saver(path, "hang")
  try:
    assert proc.stdout.readline().strip() == "inside"
  finally:
    proc.kill()
    proc.communicate(timeout=30)
  assert _temporaries(path) == [f"run.npz.tmp-{proc.pid}"]  # at most this one
  res = _run(steps=4, checkpoint_path=path)  # the old file is intact
  assert res.info.resumed_from == 2 and _temporaries(path) == []
  np.testing.assert_allclose(res.x, 1 - 0.5**4, rtol=1e-12)
