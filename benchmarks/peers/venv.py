"""Virtual environments for peers whose dependencies conflict with ours.

BOAT pins an old numpy and needs PyTorch, so it cannot share our
environment. A peer gets its own venv under ``$BILEVEL_JAX_PEERS`` (default
``.peers/`` in the working directory), created on request with
``python -m benchmarks CONFIG --setup-peers``; the benchmark then runs the peer's
script with that venv's interpreter, on data files we write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv as _venv


def peers_dir() -> str:
  return os.path.abspath(os.environ.get("BILEVEL_JAX_PEERS", ".peers"))


def python_path(name: str) -> str:
  return os.path.join(peers_dir(), name, "bin", "python")


def ensure(
  name: str, requirements: list[str], *, setup: bool, log=print, pip_args: tuple[str, ...] = ()
) -> str | None:
  """The interpreter of peer ``name``'s venv, or None when it is missing.

  With ``setup=True`` a missing venv is created and ``requirements`` are
  installed into it (this needs the package index). The requirements are
  recorded in ``requirements.json`` beside it; a venv made for other
  requirements is rebuilt only on ``setup=True``.
  """
  python = python_path(name)
  stamp = os.path.join(peers_dir(), name, "requirements.json")
  ready = os.path.exists(python) and os.path.exists(stamp)
  if ready:
    with open(stamp) as handle:
      ready = json.load(handle) == list(requirements)
  if ready:
    return python
  if not setup:
    log(
      f"peer {name}: no virtual environment at {os.path.dirname(os.path.dirname(python))} "
      f"(run with --setup-peers to create it: pip install {' '.join(requirements)}); skipped"
    )
    return None
  root = os.path.join(peers_dir(), name)
  log(f"peer {name}: creating {root} and installing {' '.join(requirements)}")
  _venv.EnvBuilder(with_pip=True, clear=True).create(root)
  subprocess.run([python, "-m", "pip", "install", "-q", *pip_args, *requirements], check=True)
  with open(stamp, "w") as handle:
    json.dump(list(requirements), handle)
  return python


def run_script(
  python: str,
  script: str,
  args: list[str],
  *,
  timeout: float | None = None,
  env: dict | None = None,
) -> subprocess.CompletedProcess:
  """Runs ``script`` with the peer's interpreter; stderr passes through."""
  full_env = dict(os.environ)
  full_env.pop("PYTHONPATH", None)  # keep our packages out of the peer's venv
  full_env.update(env or {})
  return subprocess.run(
    [python, script, *args],
    check=True,
    timeout=timeout,
    env=full_env,
    stdout=subprocess.PIPE,
    stderr=sys.stderr,
    text=True,
  )
