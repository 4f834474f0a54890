"""The paper-reproduction page is generated from templates and committed JSON."""

import json

import pytest

from experiments import results_page


def test_committed_page_is_up_to_date():
  with open(results_page.PAGE, encoding="utf-8") as handle:
    committed = handle.read()
  assert committed == results_page.render(), (
    "docs/results.md is stale: run `python -m experiments.results_page --write`"
  )


def test_placeholders_fill_values_and_tables(tmp_path):
  payload = {"summary": {"acc": 91.234}, "rows": [{"method": "BDA", "acc": 1.5}]}
  load = lambda path: payload
  assert results_page.render_text("{{ value: x.json | summary.acc | .1f }}", load) == "91.2"
  table = results_page.render_text("{{ table: x.json | rows | method, acc }}", load)
  assert table.splitlines()[0].split("|")[1].strip() == "method"
  assert "BDA" in table and "1.5" in table


def test_missing_key_names_the_file_and_path():
  with pytest.raises(KeyError, match="r.json.*summary.missing"):
    results_page.render_text(
      "{{ value: r.json | summary.missing | .1f }}", lambda p: {"summary": {}}
    )


def test_every_json_placeholder_resolves_in_the_templates():
  # render() raises on a missing file or key; this names the template too.
  import os

  for name in sorted(os.listdir(results_page.TEMPLATES)):
    with open(os.path.join(results_page.TEMPLATES, name), encoding="utf-8") as handle:
      text = handle.read()
    try:
      results_page.render_text(text)
    except (KeyError, OSError, json.JSONDecodeError) as error:
      raise AssertionError(f"{name}: {error}") from error
