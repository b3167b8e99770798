"""The documentation site's generated reference pages cover what the code declares, and the site
builds with `--strict` (a broken link or a missing page fails)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devtools import reference

ROOT = Path(__file__).resolve().parents[2]


def test_settings_page_has_every_variable():
    from service.settings import Settings, env_name
    page = reference.settings_page()
    for name in Settings.model_fields:
        assert f"| `{env_name(name)}` |" in page, name


def test_cli_page_has_every_command_and_flag():
    page = reference.cli_page()
    parsers = reference.commands()
    assert len(parsers) > 10
    for name, parser in parsers.items():
        assert f"## `sine{' ' + name if name else ''}`" in page
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_metrics_page_has_every_registered_metric_with_labels_and_buckets():
    from service.metrics import STAGE_BUCKETS, Metrics
    page = reference.metrics_page()
    families = {f.name: f for f in Metrics().registry.collect()}
    assert families
    rows = {r["name"]: r for r in reference.metric_rows()}
    for name, family in families.items():
        shown = name + ("_total" if family.type == "counter" else "")
        assert f"| `{shown}` | {family.type} |" in page, shown
        assert shown in rows
    assert rows["sine_stage_duration_seconds"]["labels"] == ["stage"]
    assert rows["sine_stage_duration_seconds"]["buckets"] == list(STAGE_BUCKETS)
    assert "0.00025" in page


def test_openapi_page_lists_every_route_of_the_app():
    doc = reference.openapi_document()
    page = reference.openapi_page()
    assert "/recommend" in doc["paths"]
    for path, ops in doc["paths"].items():
        for method in ops:
            assert f"| {method.upper()} | `{path}` |" in page
    embedded = page.split("```json\n", 1)[1].rsplit("\n```", 1)[0]
    assert json.loads(embedded) == json.loads(json.dumps(doc))


def test_manifest_page_documents_every_field_a_bundle_has(small_world):
    from index_builder.bundle import MANIFEST_DOC, MANIFEST_FIELDS
    manifest = small_world["bundle"].manifest
    undocumented = set(manifest) - set(MANIFEST_DOC)
    assert not undocumented, f"fields without a line in MANIFEST_DOC: {undocumented}"
    documented_top = {k for k in MANIFEST_DOC if "." not in k}
    assert documented_top <= set(manifest) | {"serving"}, "MANIFEST_DOC names a field never written"
    for path in MANIFEST_FIELDS:
        assert ".".join(path) in MANIFEST_DOC
    page = reference.manifest_page()
    assert "| `items.count` | yes (int) |" in page
    assert "| `git_commit` | no |" in page


def test_chart_values_page_has_every_value():
    values = yaml.safe_load((ROOT / "deploy/helm/sine-retrieval/values.yaml").read_text())
    page = reference.chart_values_page()
    for key in values["settings"]:
        assert f"| `settings.{key}` |" in page
    assert "| `replicaCount` |" in page or "| `replicas` |" in page


def test_unknown_page_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        reference.main(["nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_site_builds_strict_with_every_generated_page(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(site)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in reference.PAGES:
        assert (site / "reference" / name / "index.html").exists(), name
    for plot in ("training-curves", "accuracy-vs-time", "latency"):
        assert (site / "results" / "plots" / f"{plot}.png").stat().st_size > 1000
    home = (site / "index.html").read_text()
    assert "Two commands" in home
    results = (site / "results" / "index.html").read_text()
    assert "quality" in results.lower()


def test_site_config_turns_link_problems_into_failures():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    for check in ("unrecognized_links", "anchors", "absolute_links"):
        assert config["validation"][check] == "warn", check    # strict: a warning fails
    site = config["site_dir"]
    assert f"/{site}/" in (ROOT / ".gitignore").read_text().split()
