import gzip

import numpy as np
import pytest

from model_export import data
from model_export.data import DataError, dense_windows, load_click_log, split, synthetic, window
from tests.conftest import require_data


def test_window_most_recent_first_padded_at_end():
    assert window(np.array([5, 6, 7]), 5).tolist() == [7, 6, 5, 0, 0]
    assert window(np.arange(1, 31), 4).tolist() == [30, 29, 28, 27]
    assert window(np.array([], dtype=np.int64), 3).tolist() == [0, 0, 0]


def test_internal_ids_contiguous_by_popularity_with_padding_zero():
    ds = synthetic(n_users=200, n_items=60, n_categories=5, seed=1)
    assert ds.item_ids[0] == "<pad>"
    allids = np.concatenate(ds.sequences)
    assert allids.min() >= 1 and allids.max() == ds.n_items
    assert set(np.unique(allids)) == set(range(1, ds.n_items + 1))
    counts = np.bincount(np.concatenate([s[:-2] for s in ds.sequences]), minlength=ds.n_items + 1)[1:]
    assert (np.diff(counts) <= 0).all(), "ids must be sorted by decreasing training popularity"


def test_split_is_leave_one_out_and_every_training_position_is_a_sample():
    ds = synthetic(n_users=50, n_items=40, n_categories=4, seed=2)
    sp = split(ds, seq_len=5)
    assert len(sp.train_targets) == sum(len(s) - 3 for s in ds.sequences)
    r = 0
    for u, s in enumerate(ds.sequences):
        assert sp.test_targets[u] == s[-1] and sp.valid_targets[u] == s[-2]
        assert sp.test_inputs[u].tolist() == window(s[:-1], 5).tolist()
        assert sp.valid_inputs[u].tolist() == window(s[:-2], 5).tolist()
        train = s[:-2]
        for t in range(1, len(train)):
            assert sp.train_targets[r] == train[t]
            assert sp.train_inputs[r].tolist() == window(train[:t], 5).tolist()
            r += 1
        assert s[-1] not in sp.test_inputs[u]          # synthetic users never repeat an item


def test_synthetic_is_seeded():
    a, b = synthetic(seed=3, n_users=30), synthetic(seed=3, n_users=30)
    c = synthetic(seed=4, n_users=30)
    assert all((x == y).all() for x, y in zip(a.sequences, b.sequences))
    assert a.vocab_sha256() == b.vocab_sha256() != c.vocab_sha256()


def _csv(tmp_path, text, name="log.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_click_log_csv_string_ids_sorted_by_time_stably(tmp_path):
    p = _csv(tmp_path, "user_id,item_id,timestamp\n"
                       "alice,sku-b,20\nalice,sku-a,10\nalice,sku-c,20\nalice,sku-d,30\n"
                       "bob,sku-a,2024-01-02T00:00:00\nbob,sku-b,2024-01-01T00:00:00\nbob,sku-c,2024-01-03\n")
    ds = load_click_log(p)
    seqs = {u: [ds.item_ids[i] for i in s] for u, s in zip(ds.user_ids, ds.sequences)}
    assert seqs["alice"] == ["sku-a", "sku-b", "sku-c", "sku-d"]   # tie at 20 keeps file order
    assert seqs["bob"] == ["sku-b", "sku-a", "sku-c"]


def test_click_log_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    t = pa.table({"user_id": [1, 1, 1, 2, 2, 2], "item_id": [10, 11, 12, 12, 10, 11],
                  "timestamp": [3, 2, 1, 1, 2, 3]})
    pq.write_table(t, tmp_path / "log.parquet")
    ds = load_click_log(tmp_path / "log.parquet")
    seqs = {u: [ds.item_ids[i] for i in s] for u, s in zip(ds.user_ids, ds.sequences)}
    assert seqs == {"1": ["12", "11", "10"], "2": ["12", "10", "11"]}


@pytest.mark.parametrize("text, expect", [
    ("user_id,item_id\n1,2\n", r"log.csv:1: missing column\(s\) \['timestamp'\]"),
    ("user_id,item_id,timestamp\n1,2,3\n1,2\n", r"log.csv:3: 2 fields"),
    ("user_id,item_id,timestamp\n1,2,yesterday\n", r"log.csv:2: timestamp 'yesterday'"),
    ("user_id,item_id,timestamp\n1,,3\n", r"log.csv:2: empty user_id or item_id"),
    ("", r"log.csv: the file is empty"),
    ("user_id,item_id,timestamp\n", r"the data set is empty"),
])
def test_click_log_bad_input_names_file_and_line(tmp_path, text, expect):
    with pytest.raises(DataError, match=expect):
        load_click_log(_csv(tmp_path, text))


def test_user_with_one_interaction_is_an_error_unless_dropped(tmp_path):
    p = _csv(tmp_path, "user_id,item_id,timestamp\na,1,1\na,2,2\na,3,3\nb,1,5\n")
    with pytest.raises(DataError, match=r"log.csv:5: user 'b' has 1 interaction.*--drop-short-users"):
        load_click_log(p)
    ds = load_click_log(p, drop_short=True)
    assert ds.user_ids == ["a"]


def test_sequence_file_malformed_line_and_duplicate_user(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    with gzip.open(root / "sequences_original_ids.txt.gz", "wt") as f:
        f.write("1 10 11 12\n2 10 x 12\n")
    with pytest.raises(DataError, match=r"sequences_original_ids.txt.gz:2: expected integer ids"):
        data.load_ml1m(tmp_path)
    with gzip.open(root / "sequences_original_ids.txt.gz", "wt") as f:
        f.write("1 10 11 12\n1 10 11 12\n")
    with pytest.raises(DataError, match=r":2: user 1 appears on a second line"):
        data.load_ml1m(tmp_path)


def test_missing_data_dir_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="SINE_DATA_DIR"):
        data.load("ml-1m", tmp_path)
    with pytest.raises(DataError, match="unknown data set"):
        data.load("ml-2m", tmp_path)


@pytest.mark.data
def test_ml1m_matches_provenance(data_dir):
    require_data("ml-1m", "sequences_original_ids.txt.gz")
    ds = data.load("ml-1m", data_dir)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (6040, 3416, 999_611)
    assert len(ds.titles) == 3416 and ds.label_kind == "genre"
    toy = ds.item_ids.index("1")
    assert ds.titles[toy] == "Toy Story (1995)" and ds.labels[toy] == "Animation"


@pytest.mark.data
def test_beauty_and_ml100k_match_provenance(data_dir):
    require_data("amazon-beauty", "Beauty.txt.gz")
    b = data.load("amazon-beauty", data_dir)
    assert (b.n_users, b.n_items, b.n_interactions) == (22_363, 12_101, 198_502)
    assert len(set(b.labels.values())) == 6
    require_data("ml-100k", "u.data")
    m = data.load("ml-100k", data_dir)
    assert (m.n_users, m.n_items, m.n_interactions) == (943, 1682, 100_000)


def _random_log(seed=0, n=4000):
    """Rows in no order, string and numeric-looking ids, tied timestamps, short users."""
    rng = np.random.default_rng(seed)
    users = [f"u{k}" if k % 3 else str(k) for k in range(150)]
    items = [f"i{k}" if k % 4 else str(k) for k in range(300)]
    rows = []
    for _ in range(n):
        u = users[int(rng.zipf(1.3)) % len(users)]
        rows.append((u, items[int(rng.zipf(1.2)) % len(items)], float(rng.integers(0, 500))))
    rows += [("lonely", "i1", 3.0)]                         # one interaction: dropped
    return rows


def _same(a, b):
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert len(a.sequences) == len(b.sequences)
    for x, y in zip(a.sequences, b.sequences):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet", "folder"])
def test_streamed_logs_equal_the_row_by_row_reader(tmp_path, fmt, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _random_log()
    expect = data.sequences_from_events(
        "x", [(u, i, t, "?") for u, i, t in rows], 3, True)
    text = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{int(t)}\n" for u, i, t in rows)
    table = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "timestamp": [r[2] for r in rows]})
    if fmt == "csv":
        path = _csv(tmp_path, text)
    elif fmt == "csv.gz":
        path = tmp_path / "log.csv.gz"
        path.write_bytes(gzip.compress(text.encode()))
    elif fmt == "parquet":
        path = tmp_path / "log.parquet"
        pq.write_table(table, path, row_group_size=500)
    else:
        path = tmp_path / "logs"
        for k in range(3):                                   # split in three files, in order
            (path / f"date=2026-01-0{k + 1}").mkdir(parents=True)
            part = table.slice(k * 1400, 1400)
            pq.write_table(part, path / f"date=2026-01-0{k + 1}" / "part-0.parquet")
    from model_export.data import clicklogs
    monkeypatch.setattr(clicklogs, "STREAM_BATCH_ROWS", 700)      # many batches, ids across them
    calls = []
    real = data.sequences_from_events
    monkeypatch.setattr(clicklogs, "sequences_from_events",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got = (data.load_click_folder(path, drop_short=True) if fmt == "folder"
           else load_click_log(path, drop_short=True))
    assert not calls                                          # the streamed path read it
    _same(got, expect)
    with pytest.raises(DataError, match=r"user '([^']+)' has [12] interaction") as e:
        data.load_click_folder(path) if fmt == "folder" else load_click_log(path)
    import re
    user = re.search(r"user '([^']+)'", str(e.value)).group(1)
    first = next(k for k, r in enumerate(rows) if r[0] == user)   # the user's first row named
    assert (f"log.csv:{first + 2}:" if fmt == "csv" else f"row {first + 1}") in str(e.value) \
        or fmt in ("csv.gz", "folder")


def test_a_log_the_batches_cannot_take_is_read_row_by_row(tmp_path):
    p = _csv(tmp_path, "user_id,item_id,timestamp\na,1,2026-01-01T00:00:01\na,2,2026-01-01T00:00:02\n"
                       "a,3,2026-01-01T00:00:03\n")
    ds = load_click_log(p)                                     # ISO text timestamps
    assert [ds.item_ids[int(i)] for i in ds.sequences[0]] == ["1", "2", "3"]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_the_large_log_generator_writes_a_loadable_log(tmp_path, suffix):
    path = tmp_path / f"big.{suffix}"
    n = data.write_synthetic_log(path, 30_000, n_items=2000, n_categories=20, length=(10, 50),
                                 stay=0.9, chunk_users=200, seed=4)
    assert 30_000 <= n < 30_000 + 50 and not list(tmp_path.glob(".*tmp"))
    ds = load_click_log(path)
    assert ds.n_interactions == n
    lens = np.array([len(s) for s in ds.sequences])
    assert lens.min() >= 10 and lens.max() <= 50
    again = tmp_path / f"again.{suffix}"
    data.write_synthetic_log(again, 30_000, n_items=2000, n_categories=20, length=(10, 50),
                             stay=0.9, chunk_users=200, seed=4)
    assert again.read_bytes() == path.read_bytes()           # seeded
    # the planted categories: with stay = 0.9 most consecutive clicks share one
    rng = np.random.default_rng(4)
    cat_of = rng.integers(0, 20, size=2000)
    same = np.mean([cat_of[int(ds.item_ids[a])] == cat_of[int(ds.item_ids[b])]
                    for s in ds.sequences for a, b in zip(s[:-1], s[1:])])
    assert same > 0.85


@pytest.mark.parametrize("stride", [1, 3, 5])
def test_dense_windows_hold_every_training_pair_once_with_the_context_their_window_leaves(stride):
    ds = synthetic(n_users=40, n_items=40, n_categories=4, length=(4, 17), seed=3)
    n = 5
    x, y = dense_windows(ds, n, stride)
    assert x.shape == y.shape and x.shape[1] == n
    # every slot with a loss holds a click, and its target is the click after it in the history
    got = []
    for r in range(len(x)):
        for i in np.flatnonzero(y[r]):
            assert x[r, i] > 0
            got.append((int(y[r, i]), tuple(int(c) for c in x[r, i:] if c)))
    want = []
    for s in ds.sequences:
        train = s[:-2]
        want += [(int(train[t]), tuple(int(c) for c in window(train[:t], n) if c))
                 for t in range(1, len(train))]
    sp = split(ds, n)
    assert len(got) == len(sp.train_targets) == len(want)
    # the targets are the sliding windows' ones, each once; a prefix keeps at least n - stride + 1
    # of the clicks its sliding window holds (all of them where the history is that short)
    assert sorted(t for t, _ in got) == sorted(int(t) for t in sp.train_targets)
    by_target = {}
    for t, ctx in want:
        by_target.setdefault(t, []).append(ctx)
    for t, ctx in got:
        assert any(full[:len(ctx)] == ctx and len(ctx) >= min(len(full), n - stride + 1)
                   for full in by_target[t])


def test_dense_windows_refuse_a_stride_past_the_window():
    ds = synthetic(n_users=10, n_items=20, seed=0)
    with pytest.raises(DataError, match="stride must be in"):
        dense_windows(ds, 5, 6)
