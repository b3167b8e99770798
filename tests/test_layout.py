"""The project's import rules, read from the source and checked at run time:

- `service/` imports neither `model_export`, the CLI, the dev tooling nor the index builder's build
  code; the bundle contract (`index_builder/bundle/`) imports no other part of the project;
- nothing imports the CLI;
- only the training code imports torch, and serving never loads it, even where it is installed.
"""
import ast
import importlib.util
import json
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "index_builder", "model_export", "sine_cli", "devtools", "benchmarks",
            "loadtests")
# the modules that may import torch: training, evaluation and export (and measurements of them)
TORCH_OK = {"model_export/models/sine.py", "model_export/models/sasrec.py",
            "model_export/models/attention.py",
            "model_export/training/checkpoints.py", "model_export/training/loop.py",
            "model_export/training/distributed.py", "model_export/training/workflow.py",
            "model_export/training/interests.py",
            "model_export/evaluation/evaluate.py", "model_export/evaluation/partition.py",
            "model_export/export.py",
            "benchmarks/encoder.py", "benchmarks/gpu.py", "benchmarks/common.py",
            "benchmarks/partition.py", "benchmarks/arms_memory.py"}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, relative ones resolved."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}     # `from pkg import module`
    return out


def top(mod: str) -> str:
    return mod.split(".")[0]


def test_the_rules_see_imports_of_every_kind(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg" / "m.py"
    f.write_text("import torch.nn\nfrom . import sibling\n\ndef late():\n"
                 "    from model_export.training import train\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert {"torch.nn", "pkg.sibling", "model_export.training"} <= imported(f)


def test_service_imports_no_training_cli_devtools_or_build_code():
    for path in (ROOT / "service").rglob("*.py"):
        bad = {m for m in imported(path) if top(m) in ("model_export", "sine_cli", "devtools", "torch")
               or m.startswith(("index_builder.build", "index_builder.make"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_bundle_contract_imports_no_other_part_of_the_project():
    contract = ROOT / "index_builder" / "bundle"
    modules = sorted(contract.glob("*.py"))
    assert len(modules) > 3
    for path in modules:
        mods = imported(path)
        outside = {m for m in mods if top(m) in PACKAGES
                   and not m.startswith("index_builder.bundle")}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_nothing_imports_the_cli():
    # the reference pages print every command's --help, so they read its parser
    documents_it = ROOT / "devtools" / "reference.py"
    for path in sources():
        if path.is_relative_to(ROOT / "sine_cli") or path == documents_it:
            continue
        assert not {m for m in imported(path) if top(m) == "sine_cli"}, path.relative_to(ROOT)


def test_only_the_training_code_imports_torch():
    users = {str(p.relative_to(ROOT)) for p in sources()
             if any(top(m) == "torch" for m in imported(p))}
    assert users <= TORCH_OK, users - TORCH_OK
    assert "model_export/training/loop.py" in users          # the check does see torch imports


def test_no_module_shadows_a_package():
    names = {p.stem for p in sources()} | {p.parent.name for p in sources()}
    for pkg in PACKAGES:
        shadows = [p for p in sources() if p.stem == pkg]
        assert not shadows, f"{shadows} share the name of the package {pkg}"
    assert "service" in names


def test_no_path_hacks_in_scripts():
    for path in sources():
        assert "sys.path.insert" not in path.read_text(), path.relative_to(ROOT)


def test_every_package_folder_is_a_package():
    for pkg in PACKAGES + ("tests",):
        for d in [ROOT / pkg, *(p for p in (ROOT / pkg).rglob("*") if p.is_dir())]:
            if d.name == "__pycache__" or not any(d.glob("*.py")):
                continue
            assert (d / "__init__.py").exists(), f"{d.relative_to(ROOT)} has no __init__.py"


@pytest.mark.slow
def test_serving_never_loads_torch_where_it_is_installed(small_world, tmp_path):
    """`sine serve --help` and a real server answering /recommend, with `-X importtime`: every
    module the process imports is logged, and none is torch."""
    import subprocess

    from devtools.local import Server

    assert importlib.util.find_spec("torch") is not None, "this check needs torch installed"
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sine_cli", "serve", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--bundle" in out.stdout
    loaded = [ln.rsplit("|", 1)[-1].strip() for ln in out.stderr.splitlines() if "|" in ln]
    assert "argparse" in loaded and not [m for m in loaded if top(m) == "torch"]

    log = tmp_path / "server.log"
    server = Server({"SINE_BUNDLE": str(small_world["root"]), "SINE_WATCH_INTERVAL_S": "0"},
                    log_path=log, python_args=("-X", "importtime")).start()
    try:
        req = urllib.request.Request(server.url + "/recommend", method="POST",
                                     data=json.dumps({"user_id": "u", "n": 5}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert len(json.load(r)["items"]) == 5
    finally:
        server.stop()
    loaded = [ln.rsplit("|", 1)[-1].strip() for ln in log.read_text().splitlines()
              if ln.startswith("import time:")]
    assert {"service.app", "onnxruntime", "faiss"} <= set(loaded)
    assert not [m for m in loaded if top(m) == "torch"], "the serving process imported torch"


# radon's cyclomatic complexity counts boolean operators and comprehensions, which ruff's C901
# does not; over 20 (radon's grade D) is a function nobody wants to change
MAX_COMPLEXITY = 20
SHIPPED = ("service", "model_export", "index_builder", "sine_cli", "devtools")


def test_no_function_of_the_shipped_packages_is_over_complexity_20():
    from radon.complexity import cc_visit
    over = []
    for pkg in SHIPPED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for block in cc_visit(path.read_text()):
                if block.complexity > MAX_COMPLEXITY:
                    over.append(f"{path.relative_to(ROOT)}:{block.lineno} {block.name} "
                                f"({block.complexity})")
    assert not over, "split these: " + ", ".join(over)


def test_the_complexity_check_sees_a_complex_function(tmp_path):
    from radon.complexity import cc_visit
    branches = "".join(f"    if x == {i} and y:\n        return {i}\n" for i in range(12))
    (block,) = cc_visit(f"def f(x, y):\n{branches}    return -1\n")
    assert block.complexity > MAX_COMPLEXITY
