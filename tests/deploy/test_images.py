"""The Dockerfiles, checked without a container engine: what they copy exists, what they run
is a real `sine` command, they run as non-root, and the CPU image carries no torch."""
import re
import shlex
from pathlib import Path

import pytest

from sine_cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.gpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dockerfile(path):
    ins = instructions(path)
    stages = [r for op, r in ins if op == "FROM"]
    assert len(stages) == 2, "multi-stage: build, then a runtime stage without build tools"
    for op, rest in ins:
        if op == "COPY" and "--from=" not in rest:
            *srcs, _dest = shlex.split(rest)
            for s in srcs:
                assert (ROOT / s).exists(), f"{path.name} copies {s}, which does not exist"
    runtime = ins[[i for i, (op, _) in enumerate(ins) if op == "FROM"][-1]:]
    users = [r for op, r in runtime if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [r for op, r in ins if op == "ENTRYPOINT"][-1]
    cmd = [r for op, r in ins if op == "CMD"][-1]
    argv = eval(entry) + eval(cmd)                 # exec form: JSON arrays
    assert argv[0] == "sine"
    assert build_parser().parse_args(argv[1:]).command == "serve"
    health = [r for op, r in ins if op == "HEALTHCHECK"][-1]
    assert "/livez" in health
    installs = [r for op, r in ins if op == "RUN" and "pip install" in r]
    extra = "gpu" if path.name.endswith(".gpu") else "cpu"
    assert installs and f".[{extra}]" in installs[0]
    assert "train" not in installs[0] and "torch" not in installs[0]


def test_serving_extras_need_no_torch():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["cpu"] \
            + project["optional-dependencies"]["gpu"]:
        assert not dep.startswith("torch"), dep


def test_service_imports_without_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import service.app, service.engine, sine_cli, index_builder.fetch\n"
            "sine_cli.build_parser().parse_args(['serve'])\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
