"""The README's Python example and the docstring examples run as written."""
import doctest
import os
import re

import pytest

import bilevel_jax._src.status as status
import bilevel_jax._src.unrolled as unrolled
import bilevel_jax._src.upper_loop as upper_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [status, unrolled, upper_loop])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_readme_python_example(tmp_path, monkeypatch):
  blocks = []
  for name in ("README.md", os.path.join("docs", "reference.md")):
    with open(os.path.join(REPO, name)) as handle:
      blocks += re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)
  assert blocks
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  result = namespace["result"]
  assert abs(float(result.x) - 1.0) < 1e-2
  assert (tmp_path / "run.npz").exists()


def test_readme_performance_section_matches_the_committed_json():
  """The Performance tables are what benchmarks/performance_tables.py makes
  of benchmarks/results/*.json (regenerate with its --write)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "performance_tables", os.path.join(REPO, "benchmarks", "performance_tables.py"))
  tables = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tables)
  with open(os.path.join(REPO, "docs", "performance.md")) as handle:
    text = handle.read()
  block = text.split(tables.START, 1)[1].split(tables.END, 1)[0]
  assert block.strip() == tables.render().strip()
  assert "no committed result" not in block
