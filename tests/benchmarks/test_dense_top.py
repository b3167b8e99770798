"""benchmarks.dense_top on the small world's bundle: every top-k way and both quota paths agree
(the script asserts it before timing), and the results name what the service runs."""
import json

from benchmarks import dense_top
from service import merge, stages


def test_dense_top_writes_its_comparison(small_world, tmp_path):
    # n = 10 over 301 columns: blocks of 2, 4 and 8 run blocked, 16 falls back to one pass
    dense_top.main(["--bundle", str(small_world["root"]), "--n", "10", "--rows", "8",
                    "--rounds", "1", "--budget-ms", "1", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "dense-top.json").read_text())
    assert out["served"] == {"TOP_BLOCK": stages.TOP_BLOCK, "TOP_BLOCK_ROWS": stages.TOP_BLOCK_ROWS,
                             "SEEN_CELLS": merge.SEEN_CELLS}
    assert set(out["times"]) == {"one-pass", "blocks-2", "blocks-4", "blocks-8", "blocks-16",
                                 "seen-table", "compare"}
    assert all(t["8"]["median_us"] > 0 for t in out["times"].values())
    assert "| 8 |" in (tmp_path / "dense-top.md").read_text()
