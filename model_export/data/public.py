"""The public data sets: MovieLens-1M, Amazon Beauty and MovieLens-100K, each parsed as its
PROVENANCE.md describes, with titles and genres or categories where the files have them."""
from __future__ import annotations

import csv
from pathlib import Path

from .dataset import DataError, Dataset, from_external, open_text, sequences_from_events


def _read_user_lines(path: Path) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """`user item item ...` per line, chronological (ML-1M and Beauty ship this)."""
    users, seqs, origin = [], [], {}
    seen: set[str] = set()
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if not all(p.isdigit() for p in parts):
                raise DataError(f"{path}:{lineno}: expected integer ids `user item item ...`, "
                                f"got {line.strip()[:80]!r}")
            u, items = parts[0], parts[1:]
            if u in seen:
                raise DataError(f"{path}:{lineno}: user {u} appears on a second line; "
                                "each user must be on exactly one line.")
            seen.add(u)
            users.append(u)
            seqs.append(items)
            origin[u] = f"{path}:{lineno}"
    return users, seqs, origin


def load_ml1m(data_dir: Path, drop_short: bool = False) -> Dataset:
    root = data_dir / "ml-1m"
    users, seqs, origin = _read_user_lines(root / "sequences_original_ids.txt.gz")
    ds = from_external("ml-1m", users, seqs, origin, 3, drop_short)
    movies = root / "movies.dat"
    if movies.exists():
        index = ds.item_index()
        with open(movies, encoding="latin-1") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("::")
                if len(parts) != 3:
                    raise DataError(f"{movies}:{lineno}: expected `MovieID::Title::Genres`")
                i = index.get(parts[0])
                if i is not None:
                    ds.titles[i] = parts[1]
                    ds.labels[i] = parts[2].split("|")[0]  # first listed genre: NMI needs one label
        ds.label_kind = "genre"
    return ds


def load_beauty(data_dir: Path, drop_short: bool = False) -> Dataset:
    root = data_dir / "amazon-beauty"
    users, seqs, origin = _read_user_lines(root / "Beauty.txt.gz")
    ds = from_external("amazon-beauty", users, seqs, origin, 3, drop_short)
    meta = root / "item_meta.tsv"
    if meta.exists():
        index = ds.item_index()
        with open(meta, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"item_id", "top_category", "category_path"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{meta}:1: missing column(s) {sorted(missing)}")
            for row in reader:
                i = index.get(row["item_id"])
                if i is not None:
                    path = row["category_path"]
                    ds.titles[i] = f"{row.get('brand') or '-'} | {path}"
                    ds.labels[i] = row["top_category"]
        ds.label_kind = "category"
    return ds


def load_ml100k(data_dir: Path, drop_short: bool = False) -> Dataset:
    root = data_dir / "ml-100k"
    path = root / "u.data"

    def rows():
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split("\t")
                if len(parts) != 4:
                    raise DataError(f"{path}:{lineno}: expected 4 tab-separated columns "
                                    f"`user item rating timestamp`, got {len(parts)}")
                try:
                    ts = float(parts[3])
                except ValueError:
                    raise DataError(f"{path}:{lineno}: timestamp {parts[3].strip()!r} is not a "
                                    "number") from None
                yield parts[0], parts[1], ts, f"{path}:{lineno}"

    ds = sequences_from_events("ml-100k", rows(), 3, drop_short)
    item = root / "u.item"
    genre = root / "u.genre"
    if item.exists() and genre.exists():
        names = [ln.split("|")[0] for ln in open(genre, encoding="latin-1") if "|" in ln]
        index = ds.item_index()
        with open(item, encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("|")
                i = index.get(parts[0])
                if i is None or len(parts) < 5 + len(names):
                    continue
                ds.titles[i] = parts[1]
                flags = parts[5:5 + len(names)]
                ds.labels[i] = next((g for g, fl in zip(names, flags) if fl == "1"), "unknown")
        ds.label_kind = "genre"
    return ds
