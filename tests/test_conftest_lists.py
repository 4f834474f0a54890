"""The `extended` list in conftest.py names tests by node id: a renamed or
removed test would silently leave it (and run in the default suite, or
nowhere). Every entry must name a test that exists."""

import ast
import os
import re

from tests.conftest import EXTENDED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _names_defined(path: str) -> set[str]:
  with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
    tree = ast.parse(fh.read())
  return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_extended_node_id_names_an_existing_test():
  missing = []
  for node_id in sorted(EXTENDED):
    path, _, name = node_id.partition("::")
    if not os.path.exists(os.path.join(ROOT, path)):
      missing.append(f"{node_id} (no file {path})")
      continue
    name = re.sub(r"\[.*\]$", "", name).split(".")[-1]  # a parameter id; a doctest's module path
    if name not in _names_defined(path):
      missing.append(f"{node_id} (no function {name!r} in {path})")
  assert not missing, "stale entries in tests/conftest.py EXTENDED:\n" + "\n".join(missing)
