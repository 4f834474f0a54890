"""Atomic, uninterruptible save and checked load of upper-loop state (.npz).

A save writes ``<checkpoint>.tmp-<pid>`` in the target's folder, flushes it to
disk and renames it over the target (`os.replace` is atomic on POSIX and
Windows), so a reader sees the previous checkpoint or the new one, never a
truncated file.  SIGINT and SIGTERM that arrive during a save (in the main
thread) are held until the file is in place and then delivered, so Ctrl-C
inside ``np.savez`` ends the run *after* a complete save instead of with a
half-written ZIP.  A process killed outright (SIGKILL, power loss) can leave
its temporary file behind; the pid in its name says whose it was, and
`remove_stale_temporaries` (called by `bilevel_jax.upper.optimize` before the
first step) deletes those whose process is gone.

`load` checks the file against templates of this run (tree structure, shapes
and dtypes of every leaf, a non-negative integer step) and raises one
`CheckpointError` naming the file and the reason for any failure: unreadable,
empty, truncated, not an .npz, written by something else, or by another run.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import threading
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Written into every checkpoint; a file holding another tag is not ours.
FORMAT = "bilevel_jax.upper.optimize checkpoint v1"
_DEFERRED_SIGNALS = tuple(
  getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)
)


class CheckpointError(ValueError):
  """A checkpoint file that cannot be used by this run (the message says why).

  A `ValueError`, raised by `upper.optimize(checkpoint_path=...)` before any
  step runs when the file is unreadable, truncated, foreign, of another
  structure or dtype, or records a negative step.

  Examples:
    >>> import bilevel_jax
    >>> issubclass(bilevel_jax.CheckpointError, ValueError)
    True
  """


def not_this_run(path: str, why: str) -> CheckpointError:
  """The `CheckpointError` for ``path`` and the reason ``why``."""
  return CheckpointError(
    f"{path!r} is not a checkpoint of this run: {why}. Delete it or pick another "
    f"`checkpoint_path` (or pass `resume=False` to overwrite it)."
  )


def temporary_path(path: str) -> str:
  """The name a save of this process writes before renaming it to ``path``."""
  return f"{path}.tmp-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  except OSError:
    return True
  return True


def remove_stale_temporaries(path: str) -> list[str]:
  """Deletes ``<path>.tmp-<pid>`` files whose process no longer runs.

  A live writer's file (another process saving to the same path, or this
  one) is left alone.  Only POSIX can ask whether a pid runs without side
  effects (``os.kill(pid, 0)`` terminates it on Windows), so elsewhere
  nothing is removed.

  Returns:
    The paths removed.
  """
  if os.name != "posix":
    return []
  removed = []
  pattern = re.compile(re.escape(os.path.basename(path)) + r"\.tmp-(\d+)$")
  for candidate in glob.glob(glob.escape(path) + ".tmp-*"):
    match = pattern.match(os.path.basename(candidate))
    if match is None:
      continue
    pid = int(match.group(1))
    if pid == os.getpid() or _pid_alive(pid):
      continue
    try:
      os.remove(candidate)
      removed.append(candidate)
    except FileNotFoundError:  # removed by another process meanwhile
      pass
  return removed


@contextlib.contextmanager
def signals_deferred():
  """Holds SIGINT and SIGTERM until the block ends, then delivers them.

  The previous handlers are restored first, so a deferred Ctrl-C raises
  `KeyboardInterrupt` right after the block, and a deferred SIGTERM with the
  default action ends the process then.  Python handles signals only in the
  main thread, so elsewhere (and for handlers installed outside Python) this
  does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received: list[int] = []
  previous = {}
  try:
    for sig in _DEFERRED_SIGNALS:
      handler = signal.getsignal(sig)
      if handler is None or handler == signal.SIG_IGN:
        continue
      previous[sig] = handler
      signal.signal(sig, lambda signum, frame: received.append(signum))
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for sig in dict.fromkeys(received):
      signal.raise_signal(sig)


def _fsync_folder(folder: str) -> None:
  """Makes the rename durable (POSIX; a no-op where folders cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def check_writable(path: str, name: str = "checkpoint_path") -> None:
  """Raises a ValueError naming ``name`` unless a save to ``path`` can succeed.

  Creates the folder if needed and writes (then deletes) the temporary file
  a save would write, so a read-only folder, a parent that is a regular file
  or a ``path`` that is a folder is reported before any work is done.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"`{name}` must be a path (str or os.PathLike), got {type(path).__name__}.")
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(
      f"`{name}` = {path!r} is a folder; give a file path such as "
      f"{os.path.join(path, 'run.npz')!r}."
    )
  folder = os.path.dirname(os.path.abspath(path))
  tmp = temporary_path(path)
  try:
    os.makedirs(folder, exist_ok=True)
    with open(tmp, "wb"):
      pass
    os.remove(tmp)
  except OSError as err:
    raise ValueError(
      f"`{name}` = {path!r} cannot be written ({type(err).__name__}: "
      f"{err.strerror or err}); checked before the first step so no "
      f"work is lost. Pick a writable location."
    ) from err


def save(path: str, trees: dict[str, Any], meta: dict[str, Any]) -> None:
  """Writes each pytree's leaves and the ``meta`` arrays to ``path``, atomically
  and with SIGINT/SIGTERM held until the file is in place."""
  with signals_deferred():
    arrays = {"meta/format": np.asarray(FORMAT)}
    for name, tree in trees.items():
      for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        arrays[f"{name}/{i}"] = np.asarray(leaf)
    for key, value in meta.items():
      arrays[f"meta/{key}"] = np.asarray(value)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    try:
      with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
        handle.flush()
        os.fsync(handle.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    _fsync_folder(folder)


def _read(path: str) -> dict[str, np.ndarray]:
  """Every array of the .npz at ``path``, or CheckpointError saying why not."""
  fail = lambda why: not_this_run(path, why)
  try:
    size = os.path.getsize(path)
  except OSError as err:
    raise fail(f"it cannot be read ({type(err).__name__}: {err.strerror or err})") from err
  if size == 0:
    raise fail("the file is empty")
  try:
    with open(path, "rb") as handle:
      head = handle.read(8)
  except OSError as err:
    raise fail(f"it cannot be read ({type(err).__name__}: {err.strerror or err})") from err
  if head.startswith(b"\x93NUMPY"):
    raise fail("it holds a single .npy array, not an .npz archive")
  if head[:1] == b"\x80":
    raise fail("it holds pickled Python objects, which checkpoints never do")
  if not head.startswith(b"PK"):
    raise fail(f"it is not an .npz archive (it begins with {head!r})")
  try:
    # Opened here, not by np.load, which leaves its handle open on a bad archive.
    with open(path, "rb") as handle:
      data = np.load(handle, allow_pickle=False)
      if not isinstance(data, np.lib.npyio.NpzFile):
        raise fail("it holds a single .npy array, not an .npz archive")
      with data:
        return {key: data[key] for key in data.files}
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as err:
    raise fail(f"it is not a complete .npz archive (truncated or corrupt: {err})") from err
  except ValueError as err:
    if "pickle" in str(err):
      raise fail("it holds pickled Python objects, which checkpoints never do") from err
    raise fail(f"numpy cannot read it ({err})") from err
  except Exception as err:  # any other reader failure, re-raised named
    raise fail(f"numpy cannot read it ({type(err).__name__}: {err})") from err


def load(path: str, templates: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a checkpoint, rebuilding each pytree on the structure of its template.

  Each stored leaf must have its template's shape and dtype exactly (a
  float64 checkpoint is not cast into a float32 run), and ``meta/step`` must
  be a non-negative integer.

  Returns:
    ``(trees, meta)``: the rebuilt pytrees and the ``meta/`` entries (with
    ``step`` as a Python int).

  Raises:
    CheckpointError: a ValueError naming ``path`` and why it is not a
      checkpoint of this run.
  """
  fail = lambda why: not_this_run(path, why)
  stored = _read(path)
  if "meta/format" in stored and str(stored["meta/format"]) != FORMAT:
    raise fail(f"it was written by {str(stored['meta/format'])!r}, not by {FORMAT!r}")
  if "meta/step" not in stored:
    raise fail(
      "it has no step count (`meta/step`); it was not written by bilevel_jax.upper.optimize"
    )
  step = stored["meta/step"]
  if step.shape != () or not np.issubdtype(step.dtype, np.integer):
    raise fail(f"its step count is not an integer scalar (dtype {step.dtype}, shape {step.shape})")
  if int(step) < 0:
    raise fail(f"its step count is negative ({int(step)})")
  trees = {}
  for name, template in templates.items():
    leaves, treedef = jax.tree_util.tree_flatten(template)
    keys = [f"{name}/{i}" for i in range(len(leaves))]
    stored_keys = sorted(k for k in stored if k.startswith(name + "/"))
    if sorted(keys) != stored_keys:
      raise fail(
        f"`{name}` has {len(stored_keys)} leaves in the file, {len(keys)} in "
        f"this run (another optimizer, model or `y0`)"
      )
    new_leaves = []
    for i, (key, leaf) in enumerate(zip(keys, leaves)):
      value = stored[key]
      shape, dtype = np.shape(leaf), np.dtype(jnp.result_type(leaf))
      if value.shape != shape:
        raise fail(f"leaf {i} of `{name}` has shape {value.shape} in the file, {shape} in this run")
      if value.dtype != dtype:
        raise fail(
          f"leaf {i} of `{name}` has dtype {value.dtype} in the file, {dtype} "
          f"in this run (no silent cast; was it written with another "
          f"`jax_enable_x64` setting or dtype of `x0`/`y0`?)"
        )
      new_leaves.append(jnp.asarray(value))
    trees[name] = jax.tree_util.tree_unflatten(treedef, new_leaves)
  meta: dict[str, Any] = {
    k[len("meta/") :]: v for k, v in stored.items() if k.startswith("meta/") and k != "meta/format"
  }
  meta["step"] = int(step)
  return trees, meta
