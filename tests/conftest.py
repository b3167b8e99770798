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


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small SINE trained on seeded synthetic data, exported, and published as a bundle."""
    from index_builder.make import make_bundle
    from model_export import data
    from model_export.export import export
    from model_export.train import TrainConfig, train
    from model_export.workflow import model_config

    base = tmp_path_factory.mktemp("world")
    ds = data.synthetic(n_users=400, n_items=300, n_categories=12, length=(6, 20), seed=11)
    train(ds, model_config(ds, D=32, K=3, L=16),
          TrainConfig(batch_size=64, max_epochs=2, lr=3e-3, seed=3, threads=2), base / "run",
          progress=False)
    export(base / "run" / "best.pt", ds, base / "export", n_queries=300, log=lambda *a: None)
    b = make_bundle(base / "export", base / "bundles", version="v1", log=lambda *a: None)
    return {"ds": ds, "base": base, "export": base / "export", "root": base / "bundles",
            "bundle": b, "checkpoint": base / "run" / "best.pt"}
