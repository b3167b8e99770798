"""One CUDA major in the GPU image: the base image's, the one onnxruntime-gpu's CUDA provider
links, and the one faiss's GPU build links. A provider built for another major cannot load
(`libcudart.so.13` is not `libcudart.so.12`), and a pod with SINE_PROVIDERS=cuda would never
become ready.

The `wheels` test resolves the `gpu` extra for the image's Python and platform (pip's resolver,
nothing installed), downloads the ORT and faiss wheels it picks and reads the NEEDED entries of
their shared libraries (`readelf -d`)."""
import hashlib
import json
import re
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile.gpu"
GPU_LOCK = ROOT / "deploy" / "requirements-gpu.lock"
CPU_LOCK = ROOT / "deploy" / "requirements-cpu.lock"
# libraries whose SONAME major is the CUDA toolkit's (cuRAND, cuFFT, cuSPARSE, cuSOLVER and
# cuDNN number themselves: CUDA 13.0 ships libcusparse.so.12)
CUDA_SONAMES = re.compile(r"^lib(cudart|cublas|cublasLt|nvrtc|nvJitLink)"
                          r"\.so\.(\d+)$")
ORT, FAISS = "onnxruntime-gpu", "faiss-gpu-cu13-cuvs"
# the GPU builds and the CPU packages that must carry the same version
SAME_VERSION = {ORT: "onnxruntime", FAISS: "faiss-cpu"}


def base_image() -> tuple[int, str]:
    """(CUDA major, Ubuntu release) of the Dockerfile's `FROM nvidia/cuda:...` stages."""
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M)
    majors = set()
    for ref in froms:
        m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu(\d+\.\d+)", ref)
        assert m, f"{ref}: not an nvidia/cuda cudnn-runtime image"
        majors.add((int(m.group(1)), m.group(2)))
    assert len(majors) == 1, f"the stages use different bases: {froms}"
    return majors.pop()


def pins(lock: Path) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def cuda_majors(needed: dict[str, list[str]]) -> dict[int, list[str]]:
    """{CUDA major: ['lib.so -> libcudart.so.13', ...]} over every library's NEEDED entries."""
    out: dict[int, list[str]] = {}
    for lib, names in needed.items():
        for n in names:
            m = CUDA_SONAMES.match(n)
            if m:
                out.setdefault(int(m.group(2)), []).append(f"{lib} -> {n}")
    return out


def check_one_major(needed: dict[str, list[str]], base_major: int) -> None:
    """Fails naming the libraries when they link CUDA majors other than the base image's."""
    majors = cuda_majors(needed)
    assert majors, "no library links the CUDA runtime: not a GPU build"
    wrong = {m: libs for m, libs in majors.items() if m != base_major}
    assert not wrong, (f"the base image is CUDA {base_major}, but these link other majors: "
                       f"{json.dumps(wrong, indent=1)}")


def needed_entries(wheel: Path, into: Path) -> dict[str, list[str]]:
    """{library path in the wheel: its NEEDED entries} for every shared library in it."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if re.search(r"\.so(\.\d+)*$", name):
                path = into / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(z.read(name))
                dyn = subprocess.run(["readelf", "-d", str(path)], capture_output=True,
                                     text=True, check=True).stdout
                out[name] = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    return out


def test_the_check_fails_on_a_mix_of_majors():
    good = {"a.so": ["libcudart.so.13", "libcublas.so.13", "libcudnn.so.9", "libcurand.so.10"]}
    check_one_major(good, 13)
    with pytest.raises(AssertionError, match="libcudart.so.12"):
        check_one_major({**good, "faiss.so": ["libcudart.so.12", "libcublas.so.12"]}, 13)
    with pytest.raises(AssertionError, match="base image is CUDA 12"):
        check_one_major(good, 12)
    with pytest.raises(AssertionError, match="not a GPU build"):
        check_one_major({"cpu.so": ["libgomp.so.1"]}, 13)


def test_the_gpu_image_pins_the_cpu_images_versions():
    gpu, cpu = pins(GPU_LOCK), pins(CPU_LOCK)
    for g, c in SAME_VERSION.items():
        assert gpu[canonicalize_name(g)] == cpu[canonicalize_name(c)], (g, c)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    for dep in extra:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in gpu and req.specifier.contains(gpu[name]), (dep, gpu.get(name))
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        assert canonicalize_name(req.name) in gpu, f"the GPU lock lacks {req.name}"
    text = DOCKERFILE.read_text()
    assert "-c deploy/requirements-gpu.lock '.[gpu]'" in text
    # Ubuntu 24.04's Python is 3.12, the only Python faiss's CUDA 13 build exists for
    _, ubuntu = base_image()
    assert ubuntu == "24.04"


def _platforms() -> list[str]:
    out = []
    for tag in ["manylinux_2_39", "manylinux_2_28", "manylinux_2_27", "manylinux_2_24",
                "manylinux_2_17", "manylinux2014", "manylinux2010", "linux"]:
        out += ["--platform", f"{tag}_x86_64"]
    return out


@pytest.mark.wheels
def test_the_gpu_wheels_link_the_base_images_cuda_major(tmp_path):
    base_major, _ = base_image()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    report = tmp_path / "report.json"
    # the image's interpreter is Ubuntu 24.04's Python 3.12, not the one running the tests
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                    "--ignore-installed", "--ignore-requires-python", "--only-binary=:all:",
                    "--python-version", "3.12", *_platforms(), "--target", str(tmp_path / "t"),
                    "-c", str(GPU_LOCK), "--report", str(report), *extra],
                   check=True, timeout=600, capture_output=True)
    picked = {canonicalize_name(i["metadata"]["name"]): i
              for i in json.loads(report.read_text())["install"]}
    # every CUDA wheel the extra pulls in is of the base image's major
    for name, item in picked.items():
        version = item["metadata"]["version"]
        if name in ("nvidia-cuda-runtime", "cuda-toolkit", "nvidia-cublas"):
            assert int(version.split(".")[0]) == base_major, (name, version)
        m = re.search(r"-cu(\d+)$", name)
        if m and name != canonicalize_name(FAISS):
            assert int(m.group(1)) == base_major, (name, version)
    needed: dict[str, list[str]] = {}
    for name in (ORT, FAISS):
        info = picked[canonicalize_name(name)]["download_info"]
        wheel = tmp_path / info["url"].rsplit("/", 1)[-1]
        with urllib.request.urlopen(info["url"], timeout=300) as r:
            wheel.write_bytes(r.read())
        want = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        assert want is None or hashlib.sha256(wheel.read_bytes()).hexdigest() == want
        got = needed_entries(wheel, tmp_path / name)
        assert cuda_majors(got), f"{wheel.name} links no CUDA library"
        needed.update({f"{wheel.name}:{k}": v for k, v in got.items()})
    check_one_major(needed, base_major)
