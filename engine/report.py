"""The evaluation report as people read it: report.json, report.md and the pictures (ROC, retrieval, PCA,
outliers), each written whole or not at all (a temp name, then a rename).

Everything here only renders what engine.metrics and engine.outliers measured; each picture carries its
own title, axes or legend, and report.md says what each shows.
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

from base.files import write_atomic, write_png
from engine.data.augment import IMAGENET_MEAN, IMAGENET_STD
from engine.metrics import MIN_IMPOSTORS_ABOVE, roc_curve

ROWS = ("model", "random_init", "pixels")
IDENTITY_METRICS = ("precision_at_1", "map_at_r", "r_precision", "knn_accuracy", "roc_auc", "tar_at_far_1e-3",
                    "tar_at_far_1e-4", "verification_accuracy", "verification_accuracy_std")
PAIR_METRICS = ("accuracy", "accuracy_std", "roc_auc", "tar_at_far_1e-3")
QUERIES, NEIGHBOURS = 8, 8
"""retrieval.png: rows (random queries) and the nearest images shown for each."""
PROJECTION_IDS = 20
"""projection.png: the largest identities shown, one colour each (matplotlib's tab20 has 20 distinct ones)."""


def public(block: dict) -> dict:
    """A network's figures as report.json holds them (without the `_curves` behind the ROC picture)."""
    return {k: v for k, v in block.items() if not k.startswith("_")}


def write_report(out: Path, report: dict) -> str:
    """report.json and report.md into `out`; returns the markdown."""
    write_atomic(out / "report.json", json.dumps(report, indent=1).encode())
    md = report_md(report)
    write_atomic(out / "report.md", md.encode())
    return md


# -- report.md -------------------------------------------------------------------------------------

def _table(blocks: dict, metrics: tuple[str, ...]) -> list[str]:
    """Metrics down, networks across; a figure that rests on too few pairs is marked, its caveat below."""
    names = [n for n in ROWS if n in blocks]
    caveats = blocks["model"].get("caveats", {})
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m}{' (caveat below)' if m in caveats else ''} | " + " | ".join(f"{blocks[n][m]:.4f}" for n in names)
              + " |" for m in metrics]
    return lines + [f"\n**Caveat**: {c}." for c in caveats.values()]


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


def _picture(name: str, what: str) -> list[str]:
    return ["", f"![{name}]({name})", "", f"`{name}`: {what}"]


def _roc_caption(genuine: int, impostor: int) -> str:
    return (f"true against false accept rate (log scale) for the three networks over the same {genuine:,} genuine "
            f"and {impostor:,} impostor pairs; the grey band (false accept rates under {MIN_IMPOSTORS_ABOVE}/"
            f"{impostor:,}) rests on fewer than {MIN_IMPOSTORS_ABOVE} impostor pairs, too few to read.")


def report_md(report: dict) -> str:
    """report.json as markdown: identity metrics and their pictures, outliers and flag enrichment, then each
    benchmark; every picture linked and said in words."""
    size = report["image_size"]
    lines = [f"# Evaluation of `{report['checkpoint']}`", "",
             f"Read as: {report['checkpoint_form']}; architecture {report['arch']}; features: {report['features']}; "
             f"input {size} px" + ("; flip: image + mirrored image embeddings" if report["flip"] else "") + ".", "",
             f"Input as the model was scored (give it the same elsewhere): RGB, the shorter side resized to {size} px "
             f"(antialiased), centre-cropped to {size} x {size}, scaled to [0, 1], then normalised per channel with "
             f"mean {IMAGENET_MEAN} and std {IMAGENET_STD} (ImageNet's).", ""]
    if "split" in report:
        lines += [f"## Held-out identities: split `{report['split']}`, {report['n_images']} images of "
                  f"{report['n_identities']} identities", ""]
        lines += _table(report, IDENTITY_METRICS)
        b = report["model"]
        lines += ["", f"Pairs: {b['genuine_pairs']:,} genuine and {b['impostor_pairs']:,} impostor for AUC and "
                  f"TAR@FAR; {b['verification_pairs']:,} balanced pairs in {b['verification_folds']} "
                  "identity-disjoint folds for accuracy. Retrieval queries: "
                  f"{b['retrieval_queries']:,} (identities with one image are distractors only)."]
        lines += _picture("roc.png", _roc_caption(b["genuine_pairs"], b["impostor_pairs"]))
        lines += _picture("retrieval.png", f"{min(QUERIES, b['retrieval_queries'])} random queries (left column), "
                          f"each followed by its {min(NEIGHBOURS, report['n_images'] - 1)} nearest images under the "
                          "model, most similar first; a green frame marks an image of the query's identity, a red "
                          "one another identity.")
        shown = min(PROJECTION_IDS, report["n_identities"])
        lines += _picture("projection.png", f"the model's embeddings of the {shown} largest of the "
                          f"{report['n_identities']} identities on their first two principal components, one colour "
                          "per identity (legend: identity and its image count); identities the model tells apart "
                          "form separate clusters.")
        out = report.get("outliers")
        if out:
            counts = ", ".join(f"{k} {v}" for k, v in out["flag_counts"].items())
            lines += ["", "## Outliers and the packer's flags", "", f"How outliers are scored: {out['scoring']}", "",
                      f"Ranked images: {out['ranked']:,} (flagged: {counts}). {out['intervals']}.", ""]
            for name in ("model", "random_init"):
                lines += [f"### {name}", ""] + _enrichment_table(out["enrichment"][name]) + [""]
            lines += _picture("outliers.png", "the model's top outliers, farthest first, each captioned with its rank, "
                              "score and flags (flagged captions in red); `outliers.csv` lists every ranked image.")[1:]
    for name, bench in report.get("benchmarks", {}).items():
        b = bench["model"]
        lines += ["", f"## Benchmark `{name}` ({bench['layout']}: {bench['path']})", "",
                  f"{b['pairs']:,} pairs ({b['matched_pairs']:,} matched) from {bench['images']:,} images; "
                  f"{b['folds']} folds ({bench['folds_from']}); accuracy at the squared-L2 threshold that is best "
                  "on the other folds, mean and std over folds; ROC AUC and TAR@FAR over all pairs.", ""]
        lines += _table(bench, PAIR_METRICS)
        lines += ["", "Model thresholds per fold: " + ", ".join(f"{t:.2f}" for t in b["thresholds"])]
        lines += _picture(f"roc_{name}.png", _roc_caption(b["matched_pairs"], b["impostor_pairs"]))
    return "\n".join(lines) + "\n"


# -- pictures -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    write_png(fig, path)
    _plt().close(fig)


STYLES = {"model": {"lw": 2.2, "zorder": 3}, "random_init": {"ls": "--"}, "pixels": {"ls": ":"}}
"""Line styles that keep a curve visible where another lies on it (an untrained model on its random init)."""


def plot_roc(blocks: dict, path: Path, title: str = "Verification ROC") -> None:
    """TAR against FAR (log scale) per network over the same pairs, the pair counts in the title; the band
    where fewer than MIN_IMPOSTORS_ABOVE impostor pairs lie above the threshold is shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5))
    genuine, impostor = next(iter(blocks.values()))["_curves"]
    for name, b in blocks.items():
        far, tar = roc_curve(*b["_curves"])
        ax.plot(far, tar, label=f"{name} (AUC {b['roc_auc']:.3f})", **STYLES.get(name, {}))
    start, noisy = far[0], MIN_IMPOSTORS_ABOVE / len(impostor)
    if noisy > start:
        ax.axvspan(start, noisy, color="0.88", zorder=0,
                   label=f"under {MIN_IMPOSTORS_ABOVE} impostor pairs above the threshold")
    ax.set(xscale="log", xlabel="false accept rate (share of impostor pairs accepted)",
           ylabel="true accept rate (share of genuine pairs accepted)", ylim=(0, 1),
           title=f"{title}\n{len(genuine):,} genuine and {len(impostor):,} impostor pairs")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


Thumb = Callable[[int], Image.Image]
"""Image i of the split as RGB."""


def _square(im: Image.Image, side: int) -> Image.Image:
    return im.convert("RGB").resize((side, side))


GREEN, RED, INK = (0, 170, 0), (220, 0, 0), (0, 0, 0)


def plot_retrieval(emb: torch.Tensor, labels: torch.Tensor, thumb: Thumb, path: Path, queries: int = QUERIES,
                   k: int = NEIGHBOURS, seed: int = 0) -> None:
    """Each row: a query, then its top-k neighbours; a wrong identity gets a red frame, a right one green. A
    title and a legend above the grid say so."""
    has_pair = torch.nonzero((torch.bincount(labels)[labels] - 1) > 0).flatten().cpu().numpy()
    chosen = np.random.default_rng(seed).choice(has_pair, min(queries, len(has_pair)), replace=False)
    side, pad, gap, header = 96, 6, 12, 58
    k = min(k, len(labels) - 1)
    width = (k + 1) * (side + pad) + pad + gap
    canvas = Image.new("RGB", (width, header + max(1, len(chosen)) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    title, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    draw.text((pad, 4), f"Retrieval: {len(chosen)} random queries and their {k} nearest images under the model",
              fill=INK, font=title)
    x = pad
    for colour, words in ((GREEN, "same identity as the query"), (RED, "another identity")):
        draw.rectangle([x, 26, x + 13, 39], outline=colour, width=3)
        draw.text((x + 19, 26), words, fill=INK, font=small)
        x += 40 + int(draw.textlength(words, font=small))
    draw.text((pad, header - 15), "query", fill=INK, font=small)
    draw.text((pad + gap + side + pad, header - 15), "nearest first  ->", fill=INK, font=small)
    for row, q in enumerate(chosen):
        sims = emb @ emb[q]
        sims[q] = -2
        y = header + row * (side + pad)
        canvas.paste(_square(thumb(int(q)), side), (pad, y))
        for col, j in enumerate(torch.topk(sims, k).indices.tolist(), start=1):
            x = pad + gap + col * (side + pad)
            canvas.paste(_square(thumb(j), side), (x, y))
            colour = GREEN if labels[j] == labels[q] else RED
            draw.rectangle([x - 3, y - 3, x + side + 2, y + side + 2], outline=colour, width=3)
    write_png(canvas, path)


def largest_identities(labels: torch.Tensor, n: int) -> list[int]:
    """The `n` identities with the most images, most first (ties: the lower label first)."""
    ids, counts = torch.unique(labels.cpu(), return_counts=True)
    order = sorted(range(len(ids)), key=lambda j: (-int(counts[j]), int(ids[j])))
    return [int(ids[j]) for j in order[:n]]


def plot_projection(emb: torch.Tensor, labels: torch.Tensor, path: Path, n_ids: int = PROJECTION_IDS) -> None:
    _save_figure(projection_figure(emb, labels, n_ids), path)


def projection_figure(emb: torch.Tensor, labels: torch.Tensor, n_ids: int = PROJECTION_IDS):
    """PCA to 2-D of the `n_ids` largest identities' embeddings, one colour per identity (by rank, not by label:
    labels 20 apart used to share one), a legend with each identity's image count, and both counts in the title
    (the largest `n_ids` of how many)."""
    plt = _plt()
    labels = labels.cpu()
    chosen = largest_identities(labels, n_ids)
    total = int(torch.unique(labels).numel())
    mask = torch.isin(labels, torch.tensor(chosen))
    x = emb[mask].float().cpu()
    x = x - x.mean(0)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    share = (s**2 / (s**2).sum()).numpy()
    fig, ax = plt.subplots(figsize=(8, 6))
    colours = plt.get_cmap("tab20").colors
    for rank, identity in enumerate(chosen):
        here = (labels[mask] == identity).numpy()
        ax.scatter(xy[here, 0], xy[here, 1], s=12, color=colours[rank % len(colours)],
                   label=f"{identity} ({int(here.sum())})")
    ax.set(title=f"PCA of the model's embeddings: the {len(chosen)} largest of {total} identities\n"
                 f"({int(mask.sum()):,} images; one colour per identity)",
           xlabel=f"principal component 1 ({share[0]:.0%} of the variance)",
           ylabel=f"principal component 2 ({share[1]:.0%} of the variance)", xticks=[], yticks=[])
    ax.legend(title="identity (images)", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
              title_fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_outliers(rows: list[dict], thumb: Thumb, path: Path, count: int) -> None:
    """The top `count` outliers, each captioned with its rank, score and flags (flagged captions in red)."""
    side, cols, caption = 112, 8, 30
    top = rows[:count]
    font = ImageFont.load_default()
    header = 34
    canvas = Image.new("RGB", (cols * (side + 4) + 4, header + ((len(top) + cols - 1) // cols) * (side + caption)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"Top {len(top)} outliers of {len(rows)} ranked images, farthest first.", fill=INK, font=font)
    draw.text((4, 16), "score = cosine distance to the mean of the other images of the same identity; "
              "the packer's flags in red", fill=INK, font=font)
    for n, r in enumerate(top):
        x, y = 4 + (n % cols) * (side + 4), header + (n // cols) * (side + caption)
        canvas.paste(_square(thumb(r["index"]), side), (x, y))
        colour = (200, 0, 0) if r["flags"] else INK
        draw.text((x, y + side + 1), f"#{n + 1} score {r['score']:.3f}", fill=INK, font=font)
        draw.text((x, y + side + 14), r["flags"].replace(",", " ") or "no flags", fill=colour, font=font)
    write_png(canvas, path)


def write_outliers(rows: list[dict], thumb: Thumb, out: Path) -> None:
    """outliers.csv (every ranked image) and outliers.png (the top 16 to 48, about 1% of them)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=[k for k in rows[0] if k != "index"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out / "outliers.csv", text.getvalue())
    plot_outliers(rows, thumb, out / "outliers.png", count=max(16, min(48, len(rows) // 100)))
