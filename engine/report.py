"""The evaluation report as people read it: report.json, report.md and the pictures (ROC, retrieval, PCA,
outliers), each written whole or not at all (a temp name, then a rename).

Everything here only renders what engine.metrics and engine.outliers measured.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from base.files import write_atomic
from engine.metrics import roc_curve

ROWS = ("model", "random_init", "pixels")
IDENTITY_METRICS = ("precision_at_1", "map_at_r", "r_precision", "knn_accuracy", "roc_auc", "tar_at_far_1e-3",
                    "tar_at_far_1e-4", "verification_accuracy", "verification_accuracy_std")
PAIR_METRICS = ("accuracy", "accuracy_std", "roc_auc", "tar_at_far_1e-3")


def public(block: dict) -> dict:
    """A network's figures as report.json holds them (without the `_curves` behind the ROC picture)."""
    return {k: v for k, v in block.items() if not k.startswith("_")}


def write_report(out: Path, report: dict) -> str:
    """report.json and report.md into `out`; returns the markdown."""
    write_atomic(out / "report.json", json.dumps(report, indent=1).encode())
    md = report_md(report)
    write_atomic(out / "report.md", md.encode())
    return md


def _table(blocks: dict, metrics: tuple[str, ...]) -> list[str]:
    names = [n for n in ROWS if n in blocks]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m} | " + " | ".join(f"{blocks[n][m]:.4f}" for n in names) + " |" for m in metrics]
    return lines


def _enrichment_table(rows: list[dict]) -> list[str]:
    lines = ["| flag | top | flagged in top | share in top (95% CI) | share of ranked | enrichment (95% CI) | p |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["share_in_top_ci"]
        enr = ("n/a (none flagged)" if r["enrichment"] is None else
               f"{r['enrichment']:.2f}x ({r['enrichment_ci'][0]:.2f}-{r['enrichment_ci'][1]:.2f})")
        lines.append(f"| {r['flag']} | {r['top_share']:.0%} ({r['top_n']}) | {r['top_flagged']} | "
                     f"{r['share_in_top']:.3f} ({lo:.3f}-{hi:.3f}) | {r['share_in_split']:.3f} "
                     f"({r['flagged']}/{r['ranked']}) | {enr} | {r['p_value']:.2g} |")
    return lines


def report_md(report: dict) -> str:
    """report.json as markdown: identity metrics, outliers and flag enrichment, then each benchmark."""
    lines = [f"# Evaluation of `{report['checkpoint']}`", "",
             f"Read as: {report['checkpoint_form']}; architecture {report['arch']}; features: {report['features']}; "
             f"input {report['image_size']} px" + ("; flip: image + mirrored image embeddings" if report["flip"]
                                                   else "") + ".", ""]
    if "split" in report:
        lines += [f"## Held-out identities: split `{report['split']}`, {report['n_images']} images of "
                  f"{report['n_identities']} identities", ""]
        lines += _table(report, IDENTITY_METRICS)
        b = report["model"]
        lines += ["", f"Pairs: {b['genuine_pairs']:,} genuine and {b['impostor_pairs']:,} impostor for AUC and "
                  f"TAR@FAR; {b['verification_pairs']:,} balanced pairs in {b['verification_folds']} "
                  "identity-disjoint folds for accuracy. Retrieval queries: "
                  f"{b['retrieval_queries']:,} (identities with one image are distractors only)."]
        out = report.get("outliers")
        if out:
            counts = ", ".join(f"{k} {v}" for k, v in out["flag_counts"].items())
            lines += ["", "## Outliers and the packer's flags", "", f"How outliers are scored: {out['scoring']}", "",
                      f"Ranked images: {out['ranked']:,} (flagged: {counts}). {out['intervals']}.", ""]
            for name in ("model", "random_init"):
                lines += [f"### {name}", ""] + _enrichment_table(out["enrichment"][name]) + [""]
            lines += ["outliers.png shows the model's top outliers, each captioned with its score and flags; "
                      "outliers.csv lists every ranked image."]
    for name, bench in report.get("benchmarks", {}).items():
        b = bench["model"]
        lines += ["", f"## Benchmark `{name}` ({bench['layout']}: {bench['path']})", "",
                  f"{b['pairs']:,} pairs ({b['matched_pairs']:,} matched) from {bench['images']:,} images; "
                  f"{b['folds']} folds ({bench['folds_from']}); accuracy at the squared-L2 threshold that is best "
                  "on the other folds, mean and std over folds; ROC AUC and TAR@FAR over all pairs.", ""]
        lines += _table(bench, PAIR_METRICS)
        lines += ["", "Model thresholds per fold: " + ", ".join(f"{t:.2f}" for t in b["thresholds"])]
    return "\n".join(lines) + "\n"


# -- pictures -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    write_atomic(path, buf.getvalue())


def _save_image(im: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def plot_roc(blocks: dict, path: Path, title: str = "Verification ROC") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, b in blocks.items():
        far, tar = roc_curve(*b["_curves"])
        ax.plot(far, tar, label=f"{name} (AUC {b['roc_auc']:.3f})")
    ax.set(xscale="log", xlabel="false accept rate", ylabel="true accept rate", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


Thumb = Callable[[int], Image.Image]
"""Image i of the split as RGB."""


def _square(im: Image.Image, side: int) -> Image.Image:
    return im.convert("RGB").resize((side, side))


def plot_retrieval(emb: torch.Tensor, labels: torch.Tensor, thumb: Thumb, path: Path, queries: int = 8, k: int = 8,
                   seed: int = 0) -> None:
    """Each row: a query, then its top-k neighbours; a wrong identity gets a red frame, a right one green."""
    has_pair = torch.nonzero((torch.bincount(labels)[labels] - 1) > 0).flatten().cpu().numpy()
    chosen = np.random.default_rng(seed).choice(has_pair, min(queries, len(has_pair)), replace=False)
    side, pad = 96, 6
    k = min(k, len(labels) - 1)
    canvas = Image.new("RGB", ((k + 1) * (side + pad) + pad, max(1, len(chosen)) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, q in enumerate(chosen):
        sims = emb @ emb[q]
        sims[q] = -2
        y = pad + row * (side + pad)
        canvas.paste(_square(thumb(int(q)), side), (pad, y))
        for col, j in enumerate(torch.topk(sims, k).indices.tolist(), start=1):
            x = pad + col * (side + pad)
            canvas.paste(_square(thumb(j), side), (x, y))
            colour = (0, 170, 0) if labels[j] == labels[q] else (220, 0, 0)
            draw.rectangle([x - 3, y - 3, x + side + 2, y + side + 2], outline=colour, width=3)
    _save_image(canvas, path)


def plot_projection(emb: torch.Tensor, labels: torch.Tensor, path: Path, n_ids: int = 20) -> None:
    """PCA to 2-D of the 20 largest identities, coloured by identity."""
    plt = _plt()
    counts = torch.bincount(labels)
    top = torch.argsort(counts, descending=True)[:n_ids]
    mask = torch.isin(labels, top)
    x = emb[mask].float().cpu()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=labels[mask].cpu().numpy() % 20, cmap="tab20", s=12)
    ax.set(title=f"PCA of {int(top.numel())} identities (colour = identity)", xticks=[], yticks=[])
    fig.tight_layout()
    _save_figure(fig, path)


def plot_outliers(rows: list[dict], thumb: Thumb, path: Path, count: int) -> None:
    """The top `count` outliers, each captioned with its rank, score and flags (flagged captions in red)."""
    side, cols, caption = 112, 8, 30
    top = rows[:count]
    font = ImageFont.load_default()
    header = 34
    canvas = Image.new("RGB", (cols * (side + 4) + 4, header + ((len(top) + cols - 1) // cols) * (side + caption)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"Top {len(top)} outliers of {len(rows)} ranked images, farthest first.", fill=(0, 0, 0),
              font=font)
    draw.text((4, 16), "score = cosine distance to the mean of the other images of the same identity", fill=(0, 0, 0),
              font=font)
    for n, r in enumerate(top):
        x, y = 4 + (n % cols) * (side + 4), header + (n // cols) * (side + caption)
        canvas.paste(_square(thumb(r["index"]), side), (x, y))
        colour = (200, 0, 0) if r["flags"] else (0, 0, 0)
        draw.text((x, y + side + 1), f"#{n + 1} score {r['score']:.3f}", fill=(0, 0, 0), font=font)
        draw.text((x, y + side + 14), r["flags"].replace(",", " ") or "no flags", fill=colour, font=font)
    _save_image(canvas, path)


def write_outliers(rows: list[dict], thumb: Thumb, out: Path) -> None:
    """outliers.csv (every ranked image) and outliers.png (the top 16 to 48, about 1% of them)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=[k for k in rows[0] if k != "index"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "outliers.csv", text.getvalue())
    plot_outliers(rows, thumb, out / "outliers.png", count=max(16, min(48, len(rows) // 100)))
