"""Synthetic click data with planted interests: one generator, as faiss's `SyntheticDataset`
serves all of faiss's tests, for the unit tests (`synthetic`), the multi-interest control
(`synthetic_mix`) and logs of any size (`write_synthetic_log`).

The process: each item belongs to one of `n_categories` planted categories and has a Zipf-like
popularity within it (weight 1 / rank^0.8). Each user picks a few distinct categories and walks:
with probability `stay` the next click stays in the current category, else it jumps to one of
the user's categories (the same one included). A sequential multi-interest model can learn both
the categories and which one is active; popularity cannot. Drawn vectorized, one chunk of users
at a time, so a log of 10^8 clicks costs a chunk's memory.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_builder.bundle import atomic_open

from .dataset import Dataset, from_external


@dataclass(frozen=True)
class SyntheticClicks:
    """The planted-interest click process, its parameters and its vectorized draws."""
    n_items: int = 500
    n_categories: int = 20
    interests: tuple[int, int] = (2, 4)          # categories per user, at least, at most
    length: tuple[int, int] = (8, 40)            # clicks per user, before repeats are dropped
    stay: float = 0.8
    seed: int = 0

    def catalog(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(category of each item [M], items grouped by category [M], the per-category CDF [M]:
        category c's items span (c, c + 1] of it)."""
        cat_of = rng.integers(0, self.n_categories, size=self.n_items)            # [M]
        order = np.argsort(cat_of, kind="stable")                                # [M]
        sizes = np.bincount(cat_of, minlength=self.n_categories)                 # [C]
        w = np.concatenate([1.0 / np.arange(1, k + 1) ** 0.8 for k in sizes])     # [M]
        starts = np.r_[0, np.cumsum(sizes)[:-1]]                                 # [C]
        sums = np.add.reduceat(w, starts) if self.n_items else w
        sums = np.where(sizes > 0, sums, 1.0)          # an empty category: no mass, no division
        cdf = np.cumsum(w / np.repeat(sums, sizes))                              # [M]
        return cat_of, order, cdf

    def chunks(self, n_users: int, chunk_users: int = 50_000
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Chunks of (user of each click [n], item [n], click time [n], the users' categories
        [U, hi], -1 past each user's own count), users numbered from 0 across chunks."""
        rng = np.random.default_rng(self.seed)
        _, order, cdf = self.catalog(rng)
        lo, hi = self.interests
        hi = min(hi, self.n_categories)
        lo = min(lo, hi)
        first_user, t = 0, 1_600_000_000
        while first_user < n_users:
            u = min(chunk_users, n_users - first_user)
            k = rng.integers(lo, hi + 1, size=u)                                 # [U]
            cats = np.argsort(rng.random((u, self.n_categories)), axis=1)[:, :hi]  # [U, hi]
            lens = rng.integers(self.length[0], self.length[1] + 1, size=u)      # [U]
            n = int(lens.sum())
            owner = np.repeat(np.arange(u), lens)                                # [n]
            first = np.r_[0, np.cumsum(lens)[:-1]]
            jump = rng.random(n) > self.stay
            jump[first] = True                           # each user's walk starts somewhere
            seg = np.cumsum(jump) - 1                    # [n] which stretch of a category
            pick = (rng.random(seg[-1] + 1) * k[owner[jump]]).astype(np.int64)
            cat = cats[owner, pick[seg]]                                         # [n]
            pos = np.searchsorted(cdf, cat + rng.random(n) * (1 - 1e-12), side="right")
            items = order[np.minimum(pos, self.n_items - 1)]                    # [n]
            ts = t + np.cumsum(rng.integers(1, 600, size=n))                     # [n]
            t = int(ts[-1])
            planted = np.where(np.arange(hi)[None, :] < k[:, None], cats, -1)    # [U, hi]
            yield owner + first_user, items, ts, planted
            first_user += u


def synthetic(n_users: int = 2000, n_items: int = 500, n_categories: int = 20,
              interests_per_user: tuple[int, int] = (2, 4), length: tuple[int, int] = (8, 40),
              stay: float = 0.8, seed: int = 0, name: str = "synthetic") -> Dataset:
    """A `Dataset` of the planted-interest process, each item at most once per user (a repeat
    is dropped); users left with fewer than 3 clicks are dropped. The planted truth is kept:
    each item's category in `labels`, each user's categories in `user_labels`."""
    gen = SyntheticClicks(n_items, n_categories, interests_per_user, length, stay, seed)
    cat_of, _, _ = gen.catalog(np.random.default_rng(seed))
    users, seqs, planted = [], [], {}
    for owner, items, _, cats in gen.chunks(n_users):
        starts = np.r_[0, np.flatnonzero(np.diff(owner)) + 1, len(owner)]
        for a, b in zip(starts[:-1], starts[1:]):
            u = int(owner[a])
            _, first = np.unique(items[a:b], return_index=True)
            s = items[a:b][np.sort(first)]                                       # no repeats
            if len(s) >= 3:
                users.append(str(u))
                seqs.append([str(int(i)) for i in s])
                row = cats[u - int(owner[0])]
                planted[str(u)] = [f"c{c}" for c in sorted(row[row >= 0].tolist())]
    ds = from_external(name, users, seqs, {}, 3, False)
    for idx, x in enumerate(ds.item_ids[1:], 1):
        ds.labels[idx] = f"c{cat_of[int(x)]}"
        ds.titles[idx] = f"item {x} (c{cat_of[int(x)]})"
    ds.label_kind = "planted"
    ds.user_labels = [planted[u] for u in ds.user_ids]
    return ds


def synthetic_mix(n_users: int = 4000, n_items: int = 2000, seed: int = 0) -> Dataset:
    """The positive control for multi-interest retrieval: each user mixes 3-4 of 40 planted
    categories and the next click leaves the current one half of the time, so one vector must
    cover several categories while K interests can take one each."""
    return synthetic(n_users, n_items, n_categories=40, interests_per_user=(3, 4), length=(20, 60),
                     stay=0.5, seed=seed, name="synthetic-mix")


def write_synthetic_log(path: Path | str, n_interactions: int, n_items: int = 100_000,
                        n_categories: int = 200, length: tuple[int, int] = (10, 190),
                        stay: float = 0.8, seed: int = 0, chunk_users: int = 50_000,
                        progress: Callable[[int, int], None] | None = None) -> int:
    """The same process written as a click log (Parquet, or CSV by the suffix), one chunk of
    users at a time, repeats kept, until about `n_interactions` rows. Returns the rows written."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    gen = SyntheticClicks(n_items, n_categories, (2, 4), length, stay, seed)
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                        ("timestamp", pa.int64())])
    written = 0
    users = n_interactions // max(1, length[0]) + 1          # enough: the chunks stop early
    with atomic_open(path) as f:
        writer = (pacsv.CSVWriter(f, schema) if path.suffix.lower() == ".csv"
                  else pq.ParquetWriter(f, schema))
        try:
            for owner, items, ts, _ in gen.chunks(users, chunk_users):
                # whole users, until the clicks asked for are reached
                ends = np.r_[np.flatnonzero(np.diff(owner)) + 1, len(owner)]     # [U]
                keep = int(ends[min(np.searchsorted(ends, n_interactions - written),
                                    len(ends) - 1)])
                writer.write_table(pa.table({"user_id": pa.array(owner[:keep].astype(str)),
                                             "item_id": pa.array(items[:keep].astype(str)),
                                             "timestamp": pa.array(ts[:keep])}, schema=schema))
                written += keep
                if progress is not None:
                    progress(written, n_interactions)
                if written >= n_interactions:
                    break
        finally:
            writer.close()
    return written
