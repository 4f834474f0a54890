"""The docs: every code block runs, every public symbol is documented, the README is small."""

import functools
import inspect
import os
import re

import jax
import pytest

import bilevel_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DOC_PAGES = sorted(
  [
    os.path.relpath(os.path.join(root, name), REPO)
    for root, _, names in os.walk(os.path.join(REPO, "docs"))
    for name in names
    if name.endswith(".md")
  ]
  + ["README.md"]
)
NAMESPACES = (
  "bda",
  "implicit",
  "composite",
  "value",
  "smoothing",
  "upper",
  "meta",
  "sharding",
  "schedules",
  "prox",
  "projections",
  "problems",
  "data",
)


def _python_blocks(page: str) -> list[str]:
  with open(os.path.join(REPO, page)) as handle:
    return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_code_block_of_the_docs_runs(page, tmp_path, monkeypatch):
  """The ```python blocks of a page run in order, in one namespace, in an
  empty folder: what the docs show is what the library does."""
  blocks = _python_blocks(page)
  if not blocks:
    pytest.skip(f"{page} has no python block")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__docs__"}
  # A user's defaults (float32, rank promotion allowed), which a page may change.
  saved = (jax.config.jax_enable_x64, jax.config.jax_numpy_rank_promotion)
  jax.config.update("jax_enable_x64", False)
  jax.config.update("jax_numpy_rank_promotion", "allow")
  try:
    for block in blocks:
      exec(compile(block, page, "exec"), namespace)
  finally:
    jax.config.update("jax_enable_x64", saved[0])
    jax.config.update("jax_numpy_rank_promotion", saved[1])
  if page in ("README.md", os.path.join("docs", "index.md")):
    assert abs(float(namespace["result"].x) - 1.0) < 1e-2
    assert (tmp_path / "run.npz").exists()


def _public(namespace: str):
  module = getattr(bilevel_jax, namespace)
  return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_public_symbol_is_documented_with_an_example(namespace):
  """What the API reference shows: every public name has a docstring of its
  own (not the one a NamedTuple generates), every public function an example
  that the doctest run executes, and the namespace has its reference page."""
  assert set(NAMESPACES) == {
    n
    for n in dir(bilevel_jax)
    if inspect.ismodule(getattr(bilevel_jax, n)) and not n.startswith("_")
  }
  with open(os.path.join(REPO, "docs", "api", f"{namespace}.md")) as handle:
    assert f"::: bilevel_jax.{namespace}" in handle.read()
  undocumented, without_example = [], []
  for name, obj in _public(namespace):
    if not (callable(obj) or inspect.isclass(obj)):
      continue
    if not getattr(obj, "__module__", "").startswith("bilevel_jax"):
      continue  # a typing alias (Schedule, Prox, ...): documented where it is assigned
    doc = inspect.getdoc(obj) or ""
    if not doc or doc.startswith(f"{name}("):
      undocumented.append(name)
    if (inspect.isfunction(obj) or isinstance(obj, functools.partial)) and ">>>" not in doc:
      without_example.append(name)
  assert not undocumented, f"bilevel_jax.{namespace}: no docstring: {undocumented}"
  assert not without_example, f"bilevel_jax.{namespace}: no example: {without_example}"


def test_readme_is_small_and_its_links_resolve():
  with open(os.path.join(REPO, "README.md"), "rb") as handle:
    raw = handle.read()
  assert len(raw) < 8 * 1024, f"README.md is {len(raw)} bytes"
  for target in re.findall(r"\]\(([^)#\s]+)", raw.decode()):
    if not target.startswith(("http://", "https://", "mailto:")):
      assert os.path.exists(os.path.join(REPO, target)), f"README.md links to missing {target}"


def test_no_internal_issue_numbers_or_outside_paths_in_docs():
  pattern = re.compile(r"(\bissue #?\d+|\.\./shared|/work/|\(issue:)", re.I)
  offenders = []
  for page in DOC_PAGES:
    with open(os.path.join(REPO, page)) as handle:
      offenders += [f"{page}: {m.group(0)}" for m in pattern.finditer(handle.read())]
  for root, _, names in os.walk(os.path.join(REPO, "bilevel_jax")):
    for name in names:
      if name.endswith(".py"):
        with open(os.path.join(root, name)) as handle:
          offenders += [f"{name}: {m.group(0)}" for m in pattern.finditer(handle.read())]
  assert not offenders, offenders


def test_readme_performance_section_matches_the_committed_json():
  """The Performance tables are what benchmarks/performance_tables.py makes
  of benchmarks/results/*.json (regenerate with its --write)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "performance_tables", os.path.join(REPO, "benchmarks", "performance_tables.py")
  )
  tables = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tables)
  with open(os.path.join(REPO, "docs", "performance.md")) as handle:
    text = handle.read()
  block = text.split(tables.START, 1)[1].split(tables.END, 1)[0]
  assert block.strip() == tables.render().strip()
  assert "no committed result" not in block
  with open(os.path.join(REPO, "README.md")) as handle:
    readme = handle.read()
  headline = readme.split(tables.HEADLINE_START, 1)[1].split(tables.HEADLINE_END, 1)[0]
  assert headline.strip() == tables.headline().strip()
