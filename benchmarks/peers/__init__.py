"""Peer implementations: imported in this process (cvxpy, jaxopt) or run as
subprocesses in their own virtual environments (BOAT, see `venv`)."""

from __future__ import annotations

import importlib.metadata


def in_process_status(name: str, module, *, enabled: bool) -> str:
  """One line for a peer imported in this process: its version, or why it
  is skipped (``module`` is None when the import failed)."""
  if not enabled:
    return "skipped (peers disabled)"
  if module is None:
    return f"skipped: {name} is not installed (pip install -e .[peers])"
  return f"{name} {importlib.metadata.version(name)}, in this process"
