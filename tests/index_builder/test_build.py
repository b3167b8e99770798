from unittest.mock import ANY

import numpy as np
import pytest

from index_builder.build import (
    IndexBuildError,
    build,
    build_and_gate,
    exact_topk,
    faiss_gpu_count,
    recall_at_k,
    resolve_factory,
)


def clustered(n, d=32, centres=50, seed=0):
    """Items and queries drawn around shared centres, like trained embeddings (faiss's habit)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    xb = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    xq = c[rng.integers(0, centres, 200)] + 0.3 * rng.normal(size=(200, d)).astype(np.float32)
    return xb, xq


def brute_force(xb, ids, xq, k):
    scores = xq @ xb.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, 1)


def test_flat_index_equals_brute_force_and_keeps_ids():
    xb, xq = clustered(2000)
    ids = np.arange(1, 2001) * 7                                   # ids unrelated to row numbers
    index = build(xb, ids, "Flat")
    D, I = index.search(xq, 20)
    ref_I, ref_D = brute_force(xb, ids, xq, 20)
    assert np.allclose(D, ref_D, atol=1e-4)
    # near-equal scores may swap places: compare ids only where both neighbours are apart
    gap = np.abs(np.diff(ref_D, axis=1)) > 1e-4                      # [q, k-1]
    clear = np.concatenate([gap[:, :1], gap[:, 1:] & gap[:, :-1], gap[:, -1:]], axis=1)
    assert clear.mean() > 0.9
    assert np.array_equal(I[clear], ref_I[clear])


@pytest.mark.parametrize("factory, knob", [("HNSW32,Flat", "efSearch"), ("IVF32,Flat", "nprobe")])
def test_ann_is_tuned_to_the_smallest_knob_that_meets_the_floor(factory, knob):
    xb, xq = clustered(3000)
    ids = np.arange(1, 3001)
    b = build_and_gate(xb, ids, xq, factory=factory, k=50, floor=0.9, log=lambda *a: None)
    assert knob in b.search_params and b.recall >= 0.9
    values = [p[knob] for p, _ in b.recall_curve]
    assert values[-1] == b.search_params[knob]
    assert all(r < 0.9 for _, r in b.recall_curve[:-1]), "stopped at the first value meeting the floor"
    gt = exact_topk(xb, ids, xq, 50)
    assert recall_at_k(b.index, xq, gt, 50) == pytest.approx(b.recall)


def test_recall_gate_refuses_a_bad_index():
    xb, xq = clustered(3000)
    with pytest.raises(IndexBuildError, match=r"recall@100 0\.\d+ of 'IVF64,PQ4' is below the floor 0.95"):
        build_and_gate(xb, np.arange(1, 3001), xq, factory="IVF64,PQ4", params={"nprobe": 1},
                       log=lambda *a: None)


def test_auto_is_exact_for_small_catalogs():
    assert resolve_factory("auto", 3416) == "Flat"
    assert resolve_factory("auto", 50_000) == "Flat"
    assert resolve_factory("auto", 100_000) == "IVF1024,SQ8"
    assert resolve_factory("auto", 1_000_000) == "IVF4096,SQ8"
    assert resolve_factory("IVF4096,Flat", 10) == "IVF4096,Flat"


def test_bad_factory_and_too_many_lists_are_clear_errors():
    xb, _ = clustered(100)
    with pytest.raises(IndexBuildError, match="cannot build factory string 'Bogus12'"):
        build(xb, np.arange(100), "Bogus12")
    with pytest.raises(IndexBuildError, match="asks for 4096 lists but there are only 100 items"):
        build(xb, np.arange(100), "IVF4096,Flat")


@pytest.mark.skipif(faiss_gpu_count() > 0, reason="a GPU is present")
def test_gpu_without_a_gpu_is_a_clear_error():
    xb, _ = clustered(100)
    with pytest.raises(IndexBuildError, match="no GPU"):
        build(xb, np.arange(100), "Flat", gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(faiss_gpu_count() == 0, reason="needs faiss-gpu and a CUDA device")
def test_gpu_build_matches_cpu():
    xb, xq = clustered(5000)
    ids = np.arange(1, 5001)
    cpu = build(xb, ids, "Flat")
    gpu = build(xb, ids, "Flat", gpu=True)
    assert np.array_equal(cpu.search(xq, 10)[1], gpu.search(xq, 10)[1])


def test_a_catalog_past_the_memory_budget_is_told_to_shard():
    from index_builder.build import over_budget

    assert resolve_factory("auto", 10_000_000, 128) == "IVF4096,SQ8"     # lists capped (index-10m-lists)
    assert over_budget("IVF4096,SQ8", 1_000_000, 128) is None                  # 130 MiB
    msg = over_budget("IVF4096,SQ8", 10_000_000, 128)                           # 1.3 GiB
    assert msg and "2 or more shards" in msg
    assert over_budget("IVF4096,SQ8", 10_000_000, 128, memory_budget_mb=2048) is None
    xb, xq = clustered(3000)
    said = []
    build_and_gate(xb, np.arange(1, 3001), xq, factory="IVF16,SQ8", k=20, floor=0.5,
                   memory_budget_mb=0.1, log=said.append)
    assert any(m.startswith("warning:") and "shards" in m for m in said)


def test_pq_with_re_ranking_reaches_the_floor_and_keeps_ids():
    xb, xq = clustered(6000, d=32)
    ids = np.arange(101, 6101)
    b = build_and_gate(xb, ids, xq, factory="IVF32,PQ4x8,RFlat", k=50, floor=0.95, log=lambda *a: None)
    assert b.recall >= 0.95 and {"k_factor_rf", "nprobe"} <= set(b.search_params)   # and ht
    # faiss's autotuning: the front runs from fast to accurate, and the first point at the floor
    # is the one kept
    first = next(p for p, r in b.recall_curve if r >= 0.95)
    assert b.search_params == first
    assert all(r < 0.95 for p, r in b.recall_curve[:b.recall_curve.index((first, ANY))])
    plain = build_and_gate(xb, ids, xq, factory="IVF32,PQ4x8", k=50, floor=0.0, params={"nprobe": 32},
                           log=lambda *a: None)
    assert b.recall > plain.recall + 0.2                        # the re-ranking is what pays
    _, got = b.index.search(xq[:20], 50)
    truth = exact_topk(xb, ids, xq[:20], 50)
    assert np.mean([len(np.intersect1d(g, t)) / 50 for g, t in zip(got, truth)]) >= 0.9
    assert got.min() >= 101 and got.max() <= 6100


@pytest.mark.parametrize("factory, space", [
    ("IVF32,PQ8x4fs,Refine(SQ8)", {"nprobe", "k_factor_rf"}),       # fast-scan codes, re-ranked
    ("IVF32,PQ8x4fsr,Refine(SQ8)", {"nprobe", "k_factor_rf"}),      # of the residuals (index-10m)
    ("IVF32_HNSW16,SQ8", {"nprobe", "quantizer_efSearch"}),          # a graph over the lists
])
def test_an_index_with_two_knobs_is_autotuned_to_the_floor(factory, space):
    from index_builder.build import knobs

    xb, xq = clustered(6000, d=32)
    ids = np.arange(1, 6001)
    b = build_and_gate(xb, ids, xq, factory=factory, k=50, floor=0.9, log=lambda *a: None)
    assert set(knobs(b.index)) == space and set(b.search_params) == space
    assert b.recall >= 0.9
    _, got = b.index.search(xq, 50)
    truth, _ = brute_force(xb, ids, xq, 50)
    assert np.mean([len(np.intersect1d(g, t)) / 50 for g, t in zip(got, truth)]) == pytest.approx(b.recall)


def test_an_unreachable_floor_is_refused_after_autotuning():
    xb, xq = clustered(3000, d=32)
    with pytest.raises(IndexBuildError, match="below the floor 1.01"):
        build_and_gate(xb, np.arange(1, 3001), xq, factory="IVF16,PQ4x4fs,Refine(SQ4)", k=20,
                       floor=1.01, log=lambda *a: None)


def test_resident_memory_counts_codes_ids_and_graph_links():
    from index_builder.build import resident_mb

    n, d = 2**20, 128
    assert resident_mb("Flat", n, d) == 4 * d + 8
    assert resident_mb("IVF16384,SQ8", n, d) == d + 8
    assert resident_mb("IVF16384,PQ64x4fs,Refine(SQ8)", n, d) == 32 + 8     # 4-bit codes
    assert resident_mb("IVF4096,PQ32x8,RFlat", n, d) == 32 + 8
    assert resident_mb("HNSW32,SQ8", n, d) == d + 8 + 2 * 32 * 4            # level-0 links


def test_the_service_maps_a_re_ranking_index_read_only(tmp_path):
    import faiss

    xb, xq = clustered(4000, d=32)
    from index_builder.bundle import set_search_params

    b = build_and_gate(xb, np.arange(1, 4001), xq, factory="IVF16,PQ4x8,RFlat", k=20, floor=0.9,
                       log=lambda *a: None)
    idx = b.index
    faiss.write_index(idx, str(tmp_path / "i.faiss"))
    mapped = faiss.read_index(str(tmp_path / "i.faiss"),
                              faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    set_search_params(mapped, b.search_params)
    np.testing.assert_array_equal(mapped.search(xq[:5], 10)[1], idx.search(xq[:5], 10)[1])
