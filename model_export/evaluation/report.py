"""Markdown report and training-curve PNG for a trained model."""
from __future__ import annotations

from pathlib import Path

from .evaluate import KS


def metrics_table(rows: dict[str, dict[str, float]], ks=KS) -> str:
    """rows: name -> metrics (fractions); rendered in percent as the paper's Table 1."""
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")]
    out = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        out.append(f"| {name} | " + " | ".join(f"{100 * m[c]:.2f}" if c in m else "-" for c in cols) + " |")
    return "\n".join(out)


def plot_curves(history: list[dict], path: Path, title: str = "", best_epoch: int | None = None) -> Path | None:
    if not history:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, [h["loss"] for h in history], "o-", label="next-item loss (Eq. 9)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a1.grid(alpha=0.3)
    a1.legend()
    for key in ("valid_HR@10", "valid_NDCG@10", "valid_HR@50"):
        a2.plot(ep, [100 * h[key] for h in history], "o-", label=key.replace("valid_", "valid "))
    if best_epoch:
        a2.axvline(best_epoch, color="grey", ls="--", lw=1, label="kept (best valid)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("percent")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(name: str, metrics: dict[str, dict[str, dict[str, float]]], concepts: dict | None,
           ck_info: dict, curves: str | None) -> str:
    """metrics: split ('valid'/'test') -> row name -> metrics."""
    ma = ck_info.get("model_args", {})
    ta = ck_info.get("train_args", {})
    if ma.get("arch") == "sasrec":
        lines = [f"# SASRec on {name}", "", f"Model: SASRec, {ma.get('blocks')} blocks, "
                 f"{ma.get('heads')} heads, dropout {ma.get('dropout')}, D={ma.get('D')} "
                 f"n={ma.get('n')}; loss={ck_info.get('loss_kind')}, best epoch "
                 f"{ck_info.get('best_epoch')} of {len(ck_info.get('history', []))}."]
    else:
        lines = [f"# SINE on {name}", ""]
        lines.append(f"Model: K={ma.get('K')} L={ma.get('L')} D={ma.get('D')} n={ma.get('n')} "
                     f"tau={ma.get('tau')} aggregation={ma.get('aggregation')}; lambda={ta.get('lam')}, "
                     f"loss={ck_info.get('loss_kind')}, best epoch {ck_info.get('best_epoch')} of "
                     f"{len(ck_info.get('history', []))}.")
    lines.append("")
    lines.append("Protocol: leave-one-out, full ranking over all items, items the user interacted "
                 "with before the target excluded. Percent.")
    for split_name, rows in metrics.items():
        lines += ["", f"## {split_name}", "", metrics_table(rows)]
    if curves:
        lines += ["", "## Training curves", "", f"![training curves]({curves})"]
    if concepts:
        lines += ["", "## Concepts (§4.3)", ""]
        if "nmi" in concepts:
            lines.append(f"NMI between each item's nearest prototype (cosine) and its "
                         f"{concepts['label_kind']} ({concepts['n_labels']} values, "
                         f"{concepts['labelled_items']} items): **{concepts['nmi']:.3f}**. "
                         f"Prototypes activated on test inputs: {concepts['prototypes_used']} of "
                         f"{ma.get('L')}.")
        for case in concepts.get("case_study", []):
            lines += ["", f"### Prototype {case['prototype']} (activated for "
                          f"{case['activated_for_users']} users)", ""]
            for it in case["items"]:
                lab = f" [{it['label']}]" if it["label"] else ""
                lines.append(f"- {it['title']}{lab}")
    return "\n".join(lines) + "\n"
