"""The `Dataset`, how one is built from external ids, the leave-one-out split and windows.

Every loader returns the same `Dataset`: one chronological item sequence per user in *internal*
ids (contiguous, 1..M, 0 reserved for padding; ordered by descending training popularity, ties by
external id, so a log-uniform proposal over ids is a popularity proposal), plus the external-id
maps and optional item metadata (titles, genres or categories).

Split (paper §4.1, following SASRec): per user the last item is the test target, the
second-to-last the validation target, the rest is training. Every training position t >= 1
predicts item t from the (up to) `seq_len` items before it.

Encoder input convention, shared with the exported model and the service: a window is
`[B, seq_len]` int64, **most recent item first**, padding (0) at the end. Slot 0 is always the
latest click whatever the history length, so positional embeddings encode recency, and a Redis
list kept with LPUSH + LTRIM reads out in exactly this order.

No torch here: the service's bulk history loader reuses these loaders.
"""
from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index_builder.bundle import SineError, vocab_sha256


class DataError(SineError, ValueError):
    """A data file cannot be used; the message names the file, the line and what to do."""


@dataclass
class Dataset:
    """One chronological sequence of internal item ids per user, and the id maps."""
    name: str
    sequences: list[np.ndarray]            # per user, internal ids, oldest first
    user_ids: list[str]                    # external user id per sequence
    item_ids: list[str]                    # external id of internal id i at [i]; [0] = "<pad>"
    titles: dict[int, str] = field(default_factory=dict)     # internal id -> title
    labels: dict[int, str] = field(default_factory=dict)     # internal id -> genre / category
    label_kind: str = ""                                     # "genre", "category", "planted"
    user_labels: list[list[str]] = field(default_factory=list)   # synthetic: planted interests per user

    @property
    def n_items(self) -> int:
        """M: real items, excluding padding."""
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """External item id -> internal id."""
        return {x: i for i, x in enumerate(self.item_ids)}

    def vocab_sha256(self) -> str:
        """Hash of the internal->external item map: artifacts built on another vocabulary differ."""
        return vocab_sha256(self.item_ids)

    def summary(self) -> str:
        lens = np.array([len(s) for s in self.sequences])
        return (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, "
                f"{self.n_interactions:,} interactions, length min {lens.min()} "
                f"median {int(np.median(lens))} max {lens.max()}")


def vocab_rank(item: str, count: int) -> tuple:
    """Where an item goes in the vocabulary: most training clicks first, then numeric ids in
    numeric order, then the rest by text."""
    return (-count, int(item) if item.isdigit() else float("inf"), item)


def from_external(name: str, users: list[str], seqs: list[list[str]], origin: dict[str, str],
                   min_len: int, drop_short: bool) -> Dataset:
    """Remap external ids to internal ones; `origin` maps a user to 'file:line' for errors."""
    if not seqs:
        raise DataError(f"{name}: the data set is empty (no user has any interaction). "
                        "Check the path and the file format.")
    keep_u, keep_s = [], []
    for u, s in zip(users, seqs):
        if len(s) < min_len:
            if drop_short:
                continue
            raise DataError(
                f"{origin.get(u, name)}: user {u!r} has {len(s)} interaction(s); the leave-one-out "
                f"split needs at least {min_len} (training, validation and test items). "
                "Pass --drop-short-users to skip such users.")
        keep_u.append(u)
        keep_s.append(s)
    if not keep_s:
        raise DataError(f"{name}: no user has {min_len} or more interactions; nothing to train on.")
    # popularity over the training part only (the last two items are held out)
    counts: dict[str, int] = {}
    for s in keep_s:
        for x in s[:-2]:
            counts[x] = counts.get(x, 0) + 1
        for x in s[-2:]:
            counts.setdefault(x, 0)

    vocab = ["<pad>"] + sorted(counts, key=lambda x: vocab_rank(x, counts[x]))
    index = {x: i for i, x in enumerate(vocab)}
    seq_arr = [np.fromiter((index[x] for x in s), dtype=np.int64, count=len(s)) for s in keep_s]
    return Dataset(name=name, sequences=seq_arr, user_ids=keep_u, item_ids=vocab)


def in_time_order(clicks: Iterable[tuple[str, str, float]]) -> dict[str, list[str]]:
    """Each user's items of (user, item, timestamp) clicks in time order, ties in the order the
    clicks came: the one place clicks are sorted into sequences."""
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for n, (u, i, ts) in enumerate(clicks):
        by_user.setdefault(u, []).append((ts, n, i))
    return {u: [i for _, _, i in sorted(evs)] for u, evs in by_user.items()}


def sequences_from_events(name: str, events: Iterable[tuple[str, str, float, str]],
                           min_len: int, drop_short: bool) -> Dataset:
    """(user, item, timestamp, origin) rows in any order -> per-user sequences.

    Stable sort by timestamp: ties keep file order.
    """
    origin: dict[str, str] = {}

    def clicks() -> Iterator[tuple[str, str, float]]:
        for u, i, ts, where in events:
            origin.setdefault(u, where)
            yield u, i, ts
    seqs = in_time_order(clicks())
    users = list(seqs)
    return from_external(name, users, [seqs[u] for u in users], origin, min_len, drop_short)


def extend(base: Dataset, clicks: Iterable[tuple[str, str, float]], name: str | None = None,
           min_len: int = 3) -> Dataset:
    """`base` with new clicks (user, item, timestamp) appended to each user's sequence in time
    order, new users and new items included. The vocabulary is ranked anew by popularity; users
    with fewer than `min_len` clicks in all are left out."""
    seqs = {u: [base.item_ids[int(j)] for j in s] for u, s in zip(base.user_ids, base.sequences)}
    for u, items in in_time_order(clicks).items():
        seqs.setdefault(u, []).extend(items)
    users = list(seqs)
    ds = from_external(name or f"{base.name}+clicks", users, [seqs[u] for u in users], {},
                        min_len, True)
    old = base.item_index()
    for j, x in enumerate(ds.item_ids[1:], 1):          # keep what is known of the old items
        if x in old and old[x] in base.titles:
            ds.titles[j] = base.titles[old[x]]
        if x in old and old[x] in base.labels:
            ds.labels[j] = base.labels[old[x]]
    ds.label_kind = base.label_kind
    return ds


def open_text(path: Path, encoding: str = "utf-8"):
    if not path.exists():
        raise DataError(f"{path}: file not found. Set --data-dir (or SINE_DATA_DIR) to the folder "
                        "holding the data sets.")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding)
    return open(path, encoding=encoding, newline="")


def window(history: np.ndarray, seq_len: int) -> np.ndarray:
    """The last `seq_len` items of an oldest-first history as a most-recent-first padded row."""
    out = np.zeros(seq_len, dtype=np.int64)
    recent = history[-seq_len:][::-1]
    out[: len(recent)] = recent
    return out


@dataclass
class Split:
    """Arrays for training and for leave-one-out evaluation."""
    train_inputs: np.ndarray      # [N, n] int32, most recent first
    train_targets: np.ndarray     # [N] int64
    valid_inputs: np.ndarray      # [U, n]
    valid_targets: np.ndarray     # [U]
    test_inputs: np.ndarray       # [U, n]
    test_targets: np.ndarray      # [U]
    train_counts: np.ndarray      # [M + 1] popularity over training parts


def split(ds: Dataset, seq_len: int = 20) -> Split:
    n_train = sum(max(len(s) - 3, 0) for s in ds.sequences)
    tin = np.zeros((n_train, seq_len), dtype=np.int32)
    tgt = np.zeros(n_train, dtype=np.int64)
    U = ds.n_users
    vin = np.zeros((U, seq_len), dtype=np.int64)
    tein = np.zeros((U, seq_len), dtype=np.int64)
    vt = np.zeros(U, dtype=np.int64)
    tt = np.zeros(U, dtype=np.int64)
    counts = np.zeros(ds.n_items + 1, dtype=np.int64)
    r = 0
    for u, s in enumerate(ds.sequences):
        train = s[:-2]
        np.add.at(counts, train, 1)
        for t in range(1, len(train)):
            tin[r] = window(train[:t], seq_len)
            tgt[r] = train[t]
            r += 1
        vin[u] = window(train, seq_len)
        vt[u] = s[-2]
        tein[u] = window(s[:-1], seq_len)
        tt[u] = s[-1]
    assert r == n_train, "sample count mismatch: this is a bug"
    return Split(tin, tgt, vin, vt, tein, tt, counts)


def dense_windows(ds: Dataset, seq_len: int = 20, stride: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Training windows for dense targets: inputs [N, n] int32 (most recent first, as `window`)
    and targets [N, n] int32, where targets[r, i] is the click after the one in slot i and 0
    marks a slot without a loss.

    Windows end every `stride` clicks (default n), from each user's newest training click back.
    A window's loss sits on its `stride` newest slots, the oldest window's on all of its own, so
    every (prefix, target) pair of the training part is in exactly one window: the pairs of
    `split`'s sliding windows, each with the context its window leaves it."""
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"stride must be in [1, {seq_len}] (the window), got {stride}")
    ins, tgs = [], []
    slots = np.arange(seq_len)                                         # [n]
    for s in ds.sequences:
        train = s[:-2]
        ends = np.arange(len(train) - 1, 0, -stride)                   # [W]: window r holds train[:e]
        if not len(ends):
            continue
        held = ends[:, None] - 1 - slots[None, :]                      # [W, n]: index in train of slot i
        x = np.where(held >= 0, train[np.clip(held, 0, None)], 0)      # [W, n]
        loss = (held >= 0) & (slots[None, :] < stride)
        loss[-1] = held[-1] >= 0                                       # the oldest window: every slot
        y = np.where(loss, train[np.clip(held + 1, 0, None)], 0)       # [W, n]
        ins.append(x)
        tgs.append(y)
    if not ins:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.concatenate(ins).astype(np.int32), np.concatenate(tgs).astype(np.int32)


def dataset_info(ds: Dataset) -> dict:
    return {"name": ds.name, "users": ds.n_users, "items": ds.n_items,
            "interactions": ds.n_interactions, "vocab_sha256": ds.vocab_sha256()}


def histories(ds: Dataset, holdout: int = 0) -> Iterator[tuple[str, list[str]]]:
    """(user id, external item ids oldest first) per user, each without its last `holdout`
    clicks (1: what the offline evaluation sees before the test target)."""
    if holdout < 0:
        raise DataError(f"holdout must be >= 0, got {holdout}")
    for u, seq in zip(ds.user_ids, ds.sequences):
        items = seq[: len(seq) - holdout] if holdout else seq
        yield u, [ds.item_ids[int(i)] for i in items]
