import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SINE_DATA_DIR") or (ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


def require_data(*parts: str) -> Path:
    p = DATA_DIR.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data set not found at {p}")
    return p
