import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.data import split
from model_export.evaluation.evaluate import evaluate_merge, evaluate_model
from model_export.export import (
    OUTPUTS,
    ambiguous_rows,
    check_parity,
    choose_graph,
    choose_serving,
    export,
    export_onnx,
    probe_histories,
)
from model_export.models.sasrec import SASRec, SASRecConfig
from model_export.models.sine import SINE, FoldedSINE, SINEConfig
from model_export.training import load_checkpoint, model_from_checkpoint


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_onnx_graph_contract(small_world):
    m = onnx.load(str(small_world["export"] / "encoder.onnx"))
    onnx.checker.check_model(m)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["item_ids"]
    assert [o.name for o in m.graph.output] == list(OUTPUTS)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 20          # only the batch axis is dynamic
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert "TopK" in {n.op_type for n in m.graph.node}


@pytest.mark.parametrize("B", [1, 7, 256])
def test_onnxruntime_matches_pytorch(small_world, B):
    model = model_from_checkpoint(load_checkpoint(small_world["checkpoint"]))
    sess = session(small_world["export"] / "encoder.onnx")
    g = torch.Generator().manual_seed(B)
    x = torch.randint(1, model.config.n_items + 1, (B, 20), generator=g)
    lengths = torch.randint(1, 21, (B,), generator=g)
    lengths[0] = 1                                                 # a length-1 row in every batch
    x = x.masked_fill(torch.arange(20)[None] >= lengths[:, None], 0)
    with torch.no_grad():
        ti, tv, tw = model(x)
    oi, ov, ow = sess.run(list(OUTPUTS), {"item_ids": x.numpy()})
    assert oi.shape == (B, 3, 32) and ov.shape == (B, 32) and ow.shape == (B, 3)
    assert np.abs(oi - ti.numpy()).max() < 1e-5
    assert np.abs(ov - tv.numpy()).max() < 1e-3
    assert np.abs(ow - tw.numpy()).max() < 1e-4


def test_padding_invariance_holds_in_onnxruntime(small_world):
    sess = session(small_world["export"] / "encoder.onnx")
    x = np.zeros((3, 20), dtype=np.int64)
    x[:, :4] = [[5, 9, 2, 7]] * 3
    out = sess.run(["user_vector"], {"item_ids": x})[0]
    assert np.allclose(out[0], out[1]) and np.allclose(out[0], out[2])
    alone = sess.run(["user_vector"], {"item_ids": x[:1]})[0]
    assert np.allclose(out[0], alone[0], atol=1e-6)


def test_export_folder_contents(small_world):
    e = small_world["export"]
    ds = small_world["ds"]
    info = json.loads((e / "export.json").read_text())
    assert info["items"]["count"] == ds.n_items and info["items"]["vocab_sha256"] == ds.vocab_sha256()
    assert json.loads((e / "item_ids.json").read_text()) == ds.item_ids
    items = np.load(e / "items.npy")
    model = model_from_checkpoint(load_checkpoint(small_world["checkpoint"]))
    assert items.dtype == np.float32 and np.array_equal(items, model.H.weight[1:].detach().numpy())
    pop = np.load(e / "popularity.npy")
    assert pop[0] == 0 and pop.sum() == sum(len(s) - 2 for s in ds.sequences)
    assert np.load(e / "queries.npy").shape == (300, 32)
    assert all(v < 1e-3 for v in info["onnx"]["parity_max_abs_diff"].values())


def test_the_graph_is_folded_where_its_tables_fit_the_budget():
    m = SINE(SINEConfig(n_items=999, D=16, K=2, L=4)).eval()
    per_item = FoldedSINE.table_bytes_per_item(m.config)
    assert per_item == (2 + 2) * 16 * 4
    table_mb = 1000 * per_item / 2**20                              # M + 1 rows
    assert choose_graph(m, "auto", fold_budget_mb=table_mb) == "folded"
    assert choose_graph(m, "auto", fold_budget_mb=table_mb * 0.99) == "plain"
    assert choose_graph(m, "folded", fold_budget_mb=0) == "folded"   # asked for: no budget
    assert choose_graph(m, "plain") == "plain"
    with pytest.raises(ValueError, match="graph must be"):
        choose_graph(m, "fast")


@pytest.mark.parametrize("literal, aggregation, activation, residual", [
    (False, "adaptive", "attention", False), (True, "adaptive", "attention", False),
    (False, "mean", "attention", False), (False, "adaptive", "votes", False),
    (False, "adaptive", "attention", True)])
def test_the_folded_graph_computes_what_the_model_does(tmp_path, literal, aggregation, activation,
                                                       residual):
    torch.manual_seed(1)
    m = SINE(SINEConfig(n_items=200, D=32, K=3, L=8, literal=literal, aggregation=aggregation,
                        activation=activation, residual=residual)).eval()
    path = export_onnx(FoldedSINE(m), tmp_path / "folded.onnx")
    worst = check_parity(m, path)
    assert worst["interests"] < 1e-5 and worst["user_vector"] < 1e-3 and worst["weights"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Gather" in ops and "TopK" in ops


@pytest.mark.parametrize("aggregation, residual", [("adaptive", False), ("latest", False),
                                                   ("adaptive", True)])
def test_a_sine_on_a_backbone_exports_plain_with_parity(tmp_path, aggregation, residual):
    torch.manual_seed(2)
    m = SINE(SINEConfig(n_items=200, D=32, K=3, L=8, blocks=2, heads=2, dropout=0.1,
                        aggregation=aggregation, residual=residual)).eval()
    assert choose_graph(m) == "plain"
    with pytest.raises(ValueError, match="backbone exports plain"):
        choose_graph(m, "folded")
    with pytest.raises(ValueError, match="no item-side"):
        FoldedSINE(m)
    worst = check_parity(m, export_onnx(m, tmp_path / "plain.onnx"))
    assert max(worst.values()) < 1e-5, worst


def test_export_records_the_graph_and_its_memory(small_world, tmp_path):
    info = json.loads((small_world["export"] / "export.json").read_text())
    K, D = small_world["bundle"].manifest["model"]["K"], small_world["bundle"].manifest["model"]["D"]
    assert info["onnx"]["graph"] == "folded"                      # a small catalog: auto folds
    assert info["onnx"]["table_bytes_per_item"] == (2 + K) * D * 4
    assert small_world["bundle"].manifest["onnx"]["graph"] == "folded"
    plain = export(small_world["checkpoint"], small_world["ds"], tmp_path / "plain",
                   n_queries=50, graph="plain", log=lambda *a: None)
    assert plain["onnx"]["graph"] == "plain" and plain["onnx"]["table_bytes_per_item"] == 0
    # serving="auto": the aggregate and the K > 1 merges scored on validation, the best kept
    valid = plain["serving"]["valid"]
    assert set(valid) == {"aggregate", "per_interest/max", "per_interest/weighted",
                          "per_interest/quota"}
    best = max(v["HR@50"] for v in valid.values())
    chosen = plain["serving"]["mode"] + ("/" + plain["serving"]["merge"]
                                         if plain["serving"]["merge"] else "")
    assert valid[chosen]["HR@50"] == best
    assert chosen != "aggregate" or valid["aggregate"]["HR@50"] == best
    assert plain["serving"]["chosen_on"] == "valid HR@50"
    assert json.loads((tmp_path / "plain" / "export.json").read_text())["serving"] == plain["serving"]
    assert max(plain["onnx"]["parity_max_abs_diff"].values()) < 1e-3
    a = session(small_world["export"] / "encoder.onnx")
    b = session(tmp_path / "plain" / "encoder.onnx")
    x = np.zeros((4, 20), dtype=np.int64)
    x[:, :5] = np.arange(1, 21).reshape(4, 5)
    for u, v in zip(a.run(None, {"item_ids": x}), b.run(None, {"item_ids": x})):
        np.testing.assert_allclose(u, v, atol=1e-4)


def test_serving_is_the_validation_argmax_with_ties_to_the_aggregate(small_world):
    ds = small_world["ds"]
    model = model_from_checkpoint(load_checkpoint(small_world["checkpoint"]))
    sp = split(ds, model.config.n)
    got = choose_serving(model, ds, sp)
    want = {"aggregate": evaluate_model(model, ds, sp, "valid")}
    want.update({f"per_interest/{h}": evaluate_merge(model, ds, sp, h, "valid")
                 for h in ("max", "weighted", "quota")})
    assert set(got["valid"]) == set(want)
    for c in want:
        assert got["valid"][c] == pytest.approx(want[c])
    order = sorted(want, key=lambda c: (-want[c]["HR@50"], c != "aggregate"))
    assert (got["mode"] + ("/" + got["merge"] if got["merge"] else "")) == order[0]
    # the aggregate's own figures, when given, are not recomputed; equal ones win over a merge
    tie = {k: 1.0 for k in want["per_interest/max"]}
    forced = choose_serving(model, ds, sp, valid_aggregate=tie)
    assert (forced["mode"], forced["merge"]) == ("aggregate", None)
    fixed = choose_serving(model, ds, sp, "quota")
    assert (fixed["mode"], fixed["merge"], fixed["chosen_on"]) == ("per_interest", "quota",
                                                                   "fixed at export")
    assert set(fixed["valid"]) == {"aggregate", "per_interest/quota"}
    assert choose_serving(model, ds, sp, "aggregate")["mode"] == "aggregate"
    with pytest.raises(ValueError, match="serving must be one of"):
        choose_serving(model, ds, sp, "median")


def test_a_single_interest_model_serves_its_aggregate():
    from model_export import data
    ds = data.synthetic(n_users=60, n_items=40, n_categories=4, length=(5, 9), seed=1)
    torch.manual_seed(0)
    m = SINE(SINEConfig(n_items=ds.n_items, D=8, K=1, L=4)).eval()
    sp = split(ds, m.config.n)
    got = choose_serving(m, ds, sp)
    assert (got["mode"], got["merge"], list(got["valid"])) == ("aggregate", None, ["aggregate"])
    with pytest.raises(ValueError, match="K = 1"):
        choose_serving(m, ds, sp, "max")


def planted_tie(activation="attention"):
    """A SINE whose length-1 history [1] scores prototypes 0 and 1 equally, above the rest."""
    torch.manual_seed(3)
    m = SINE(SINEConfig(n_items=40, D=16, K=2, L=6, activation=activation)).eval()
    with torch.no_grad():
        h = m.H.weight[1] / m.H.weight[1].norm()                     # z of the history [1]
        u = torch.randn(16)
        u -= (u @ h) * h                                              # orthogonal to z
        m.C[0] = 5 * h
        m.C[1] = 5 * h + 3 * u / u.norm()                             # same <z, C>, another direction
    return m


def test_ambiguous_rows_are_the_near_ties_of_the_activation_keys():
    m = planted_tie()
    x = torch.zeros(3, m.config.n, dtype=torch.long)
    x[0, 0], x[1, :2], x[2, :5] = 1, torch.tensor([1, 7]), torch.tensor([3, 9, 4, 2, 8])
    got = ambiguous_rows(m, x)
    assert got[0] and not got[1:].any()
    # brute force over random histories: the smallest gap among the top K + 1 keys
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 41, (200, m.config.n), generator=g)
    key = m.activation_keys(x).numpy()                               # [200, L]
    top = -np.sort(-key, axis=1)[:, :3]
    tied = np.diff(-top, axis=1).min(1) <= 1e-5 * np.maximum(np.abs(top).max(1), 1.0)
    assert (ambiguous_rows(m, x).numpy() == tied).all()
    assert (ambiguous_rows(m, x, tol=1.0).numpy()).all()              # every gap is within 1.0
    assert not ambiguous_rows(SASRec(SASRecConfig(n_items=40, D=16)).eval(), x).any()


@pytest.mark.parametrize("activation", ["attention", "votes"])
def test_parity_probes_avoid_ties_and_keep_a_length_one_row(activation):
    m = planted_tie(activation)
    g = torch.Generator().manual_seed(0)
    for B in (1, 7, 64):
        x = probe_histories(m, B, g)
        lengths = (x > 0).sum(1)
        assert x.shape == (B, m.config.n) and lengths[0] == 1 and (lengths >= 1).all()
        assert ((x > 0) == (torch.arange(m.config.n)[None] < lengths[:, None])).all()   # pads last
        assert not ambiguous_rows(m, x).any()


def test_parity_holds_on_a_model_with_a_planted_tie(tmp_path):
    m = planted_tie()
    path = export_onnx(FoldedSINE(m), tmp_path / "tie.onnx")
    worst = check_parity(m, path)
    assert worst["interests"] < 1e-5 and worst["user_vector"] < 1e-3 and worst["weights"] < 1e-4


def test_parity_check_catches_a_wrong_graph(tmp_path):
    torch.manual_seed(0)
    a = SINE(SINEConfig(n_items=30, D=16, K=2, L=4)).eval()
    b = SINE(SINEConfig(n_items=30, D=16, K=2, L=4)).eval()
    export_onnx(b, tmp_path / "other.onnx")
    assert max(check_parity(a, tmp_path / "other.onnx", batch_sizes=(4,)).values()) > 1e-2


@pytest.mark.data
@pytest.mark.slow
def test_ml1m_top50_agrees_between_onnxruntime_and_pytorch(data_dir, tmp_path):
    """A briefly trained ML-1M model: ORT and torch retrieve the same top-50 for >= 99.9% of users."""
    from model_export import data
    from model_export.data import split
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import model_config
    from tests.conftest import require_data
    require_data("ml-1m", "sequences_original_ids.txt.gz")
    ds = data.load("ml-1m", data_dir)
    train(ds, model_config(ds), TrainConfig(max_epochs=1, max_minutes=0.4, threads=2), tmp_path,
          progress=False)
    model = model_from_checkpoint(load_checkpoint(tmp_path / "best.pt"))
    sp = split(ds)
    H = model.H.weight[1:].detach().numpy()
    with torch.no_grad():
        tv = model(torch.from_numpy(sp.test_inputs))[1].numpy()
    top_t = np.argsort(-(tv @ H.T), axis=1)[:, :50]
    for graph in (model, FoldedSINE(model)):                      # both graphs the export makes
        export_onnx(graph, tmp_path / "enc.onnx")
        ov = session(tmp_path / "enc.onnx").run(["user_vector"], {"item_ids": sp.test_inputs})[0]
        top_o = np.argsort(-(ov @ H.T), axis=1)[:, :50]
        same = np.mean([set(a) == set(b) for a, b in zip(top_t, top_o)])
        assert same >= 0.999, (type(graph).__name__, same)
