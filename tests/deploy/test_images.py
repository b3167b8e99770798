"""The Dockerfiles, checked without a container engine: what they copy exists, what they run
is a real `sine` command, they run as non-root, and the images carry no torch and no training
code. (That serving never imports torch is tested in tests/test_layout.py.)"""
import json
import re
import shlex
from pathlib import Path

import pytest

from sine_cli.main import build_parser

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
    argv = json.loads(entry) + json.loads(cmd)     # exec form: JSON arrays
    assert argv[0] == "sine"
    assert build_parser().parse_args(argv[1:]).command == "serve"
    health = [r for op, r in ins if op == "HEALTHCHECK"][-1]
    assert "service.healthcheck" in health          # /livez on SINE_PORT, not a fixed port
    installs = [r for op, r in ins if op == "RUN" and "pip install" in r]
    extra = "gpu" if path.name.endswith(".gpu") else "cpu"
    assert installs and f".[{extra}]" in installs[0]
    assert "train" not in installs[0] and "torch" not in installs[0]
    copied = {src for op, rest in ins if op == "COPY" and "--from=" not in rest
              for src in shlex.split(rest)[:-1]}
    assert not any(c.startswith(("model_export", "devtools", "benchmarks", "loadtests",
                                 "index_builder/build", "index_builder/make")) for c in copied), copied


def test_serving_extras_need_no_torch():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["cpu"] \
            + project["optional-dependencies"]["gpu"]:
        assert not dep.startswith("torch"), dep


def test_training_image_runs_refresh():
    path = ROOT / "deploy" / "Dockerfile.train"
    ins = instructions(path)
    for op, rest in ins:
        if op == "COPY" and "--from=" not in rest:
            for s in shlex.split(rest)[:-1]:
                assert (ROOT / s).exists(), s
    runtime = ins[[i for i, (op, _) in enumerate(ins) if op == "FROM"][-1]:]
    assert [r for op, r in runtime if op == "USER"][-1] not in ("root", "0")
    argv = json.loads([r for op, r in ins if op == "ENTRYPOINT"][-1]) + \
        json.loads([r for op, r in ins if op == "CMD"][-1])
    assert argv[0] == "sine" and argv[1] == "refresh"
    installs = [r for op, r in ins if op == "RUN" and "pip install" in r]
    assert ".[cpu,train]" in installs[0]


def test_python_images_are_pinned_to_a_patched_release():
    """A floating `python:3.11-slim` can be any 3.11; the tarfile filter fixes of
    CVE-2025-4517 are in 3.11.13, 3.12.11 and 3.13.4."""
    floor = {(3, 11): 13, (3, 12): 11, (3, 13): 4}
    for path in (ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.train"):
        for op, rest in instructions(path):
            if op != "FROM":
                continue
            m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim(?: AS \w+)?", rest)
            assert m, f"{path.name}: {rest} is not a pinned python release"
            major, minor, patch = map(int, m.groups())
            assert patch >= floor.get((major, minor), 0), f"{path.name}: {rest}"


def test_the_cpu_lock_covers_every_dependency_and_meets_every_floor():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "deploy" / "requirements-cpu.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for dep in project["dependencies"] + project["optional-dependencies"]["cpu"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"the lock lacks {req.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} breaks {dep}"
    install = [r for op, r in instructions(ROOT / "deploy" / "Dockerfile") if op == "RUN"
               and "pip install" in r][0]
    assert "-c deploy/requirements-cpu.lock" in install


def test_the_healthcheck_follows_sine_port(small_world, serve, monkeypatch):
    from service import healthcheck
    from service.settings import Settings

    with serve(Settings(bundle=str(small_world["root"]), watch_interval_s=0)) as c:
        monkeypatch.setenv("SINE_PORT", str(c.port))          # not 8000
        assert healthcheck.main() == 0
    monkeypatch.setenv("SINE_PORT", str(c.port))
    assert healthcheck.main(timeout_s=0.5) == 1               # the server is gone
