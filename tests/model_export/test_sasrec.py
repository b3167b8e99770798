"""SASRec in SINE's harness: causal and padding-blind, trained by the same trainer, exported
as a K = 1 bundle that the service serves in both modes with no code path of its own."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_export import data
from model_export.data import split
from model_export.evaluation.evaluate import evaluate_model, evaluate_popularity
from model_export.export import choose_graph, export
from model_export.models.sasrec import SASRec, SASRecConfig
from model_export.training import TrainConfig, load_checkpoint, model_from_checkpoint, train
from model_export.training.workflow import model_config
from service.settings import Settings


def rows(M: int, B: int, n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, M + 1, (B, n), generator=g)
    lengths = torch.randint(1, n + 1, (B,), generator=g)
    return x.masked_fill(torch.arange(n)[None] >= lengths[:, None], 0)


def test_a_slot_sees_itself_and_older_clicks_only():
    m = SASRec(SASRecConfig(n_items=50, D=16, heads=2)).eval()
    x = torch.arange(1, 21).unsqueeze(0)                               # [1, 20], all real
    y = x.clone()
    y[0, 3] = 42                                                       # change the 4th most recent
    with torch.no_grad():
        hx, hy = m.hidden(x), m.hidden(y)                              # [1, 20, 16]
    moved = (hx - hy).abs().amax(-1)[0]                                # [20]
    assert torch.all(moved[4:] == 0)                                   # older slots: untouched
    assert torch.all(moved[:4] > 0)                                    # it and newer slots: moved


def test_outputs_ignore_padding_and_batch_neighbours_and_have_k1_shapes():
    m = SASRec(SASRecConfig(n_items=50, D=16)).eval()
    x = rows(50, 6)
    x[0] = 0
    x[0, 0] = 7                                                        # one click
    with torch.no_grad():
        phi, v, e = m(x)
        alone = m(x[:1])[1]
    assert phi.shape == (6, 1, 16) and v.shape == (6, 16) and e.shape == (6, 1)
    assert torch.equal(phi[:, 0], v) and torch.all(e == 1)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v[:1], alone)


def test_config_refuses_what_sasrec_does_not_have():
    ds = data.synthetic(n_users=50, n_items=40, seed=0)
    with pytest.raises(ValueError, match="SASRec takes"):
        model_config(ds, "sasrec", K=4)
    with pytest.raises(ValueError, match="multiple of heads"):
        SASRecConfig(n_items=10, D=30, heads=4)
    with pytest.raises(ValueError, match="arch must be"):
        model_config(ds, "gru4rec")
    assert model_config(data.synthetic(n_users=50, n_items=40, seed=0), "sasrec").dropout == 0.2


@pytest.fixture(scope="module")
def sasrec_world(tmp_path_factory):
    from index_builder.make import make_bundle

    base = tmp_path_factory.mktemp("sasrec")
    ds = data.synthetic(n_users=400, n_items=300, n_categories=12, length=(6, 20), seed=11)
    res = train(ds, model_config(ds, "sasrec", D=32, heads=2, dropout=0.1),
                TrainConfig(batch_size=32, max_epochs=4, lr=3e-3, seed=3, threads=2),
                base / "run", progress=False)
    info = export(base / "run" / "best.pt", ds, base / "export", n_queries=300, log=lambda *a: None)
    b = make_bundle(base / "export", base / "bundles", version="v1", log=lambda *a: None)
    return {"ds": ds, "res": res, "info": info, "bundle": b, "root": base / "bundles",
            "items": np.load(base / "export" / "items.npy"),
            "ck": base / "run" / "best.pt"}


def test_the_trainer_trains_it_past_popularity(sasrec_world):
    ds, ck = sasrec_world["ds"], load_checkpoint(sasrec_world["ck"])
    model = model_from_checkpoint(ck)
    assert isinstance(model, SASRec) and ck["model_args"]["arch"] == "sasrec"
    sp = split(ds)
    ours, pop = evaluate_model(model, ds, sp), evaluate_popularity(ds, sp)
    assert ours["HR@10"] > 2 * pop["HR@10"]
    # per-interest with one interest is the aggregate vector
    assert evaluate_model(model, ds, sp, mode="per_interest") == ours


def test_export_is_a_plain_k1_bundle(sasrec_world):
    info, b = sasrec_world["info"], sasrec_world["bundle"]
    assert info["onnx"]["graph"] == "plain" and info["model"]["K"] == 1
    assert b.manifest["model"]["arch"] == "sasrec" and b.manifest["model"]["K"] == 1
    model = model_from_checkpoint(load_checkpoint(sasrec_world["ck"]))
    with pytest.raises(ValueError, match="exports plain"):
        choose_graph(model, "folded")
    sess = ort.InferenceSession(str(b.file("encoder")), providers=["CPUExecutionProvider"])
    x = rows(300, 9, seed=4)
    interests, uv, w = sess.run(None, {"item_ids": x.numpy()})
    with torch.no_grad():
        ref = model(x)[1].numpy()
    assert interests.shape == (9, 1, 32) and w.shape == (9, 1)
    np.testing.assert_allclose(uv, ref, atol=1e-4)


@pytest.mark.parametrize("mode", ["aggregate", "per_interest"])
def test_the_service_serves_it_like_any_bundle(sasrec_world, redis_server, serve, mode):
    ds, b = sasrec_world["ds"], sasrec_world["bundle"]
    s = Settings(bundle=str(sasrec_world["root"]), redis_url=redis_server.url, watch_interval_s=0,
                 redis_key_template="sasrec:{user_id}")
    hist = [ds.item_ids[int(i)] for i in ds.sequences[5][::-1]]         # newest first
    r = redis_server.client()
    r.delete("sasrec:u5")
    r.rpush("sasrec:u5", *hist)
    sess = ort.InferenceSession(str(b.file("encoder")), providers=["CPUExecutionProvider"])
    index = ds.item_index()
    win = np.zeros((1, 20), dtype=np.int64)
    known = [index[h] for h in hist][:20]
    win[0, :len(known)] = known
    uv = sess.run(["user_vector"], {"item_ids": win})[0]                # [1, D]
    with serve(s) as c:
        got = c.post("/recommend", json={"user_id": "u5", "n": 15, "mode": mode,
                                          "include_interests": True})
        assert got.status_code == 200, got.text
        body = got.json()
    assert body["mode"] == mode and body["interest_weights"] == [pytest.approx(1.0)]
    scores = (uv @ sasrec_world["items"].T)[0]                         # [M], brute force
    order = [int(i) + 1 for i in np.argsort(-scores, kind="stable") if int(i) + 1 not in set(known)]
    assert [x["item_id"] for x in body["items"]] == [ds.item_ids[i] for i in order[:15]]
    assert not {x["item_id"] for x in body["items"]} & set(hist)
