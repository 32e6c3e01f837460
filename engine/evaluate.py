"""python -m engine.evaluate --data OUT --checkpoint RUN_OR_SAFETENSORS --out EVAL [options]

How well do the embeddings separate identities never trained on? The model is compared with the same
architecture untrained and with raw pixels, on the same images, with the metrics of REFERENCE.md §7.
Writes report.json, report.md, roc.png, retrieval.png, projection.png, outliers.png and outliers.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from engine.data import AugmentConfig, EvalLoader, Split
from engine.data.shards import read_member
from engine.metrics import precision_at_1, retrieval, roc_curve, verification
from engine.model import ModelConfig, SimCLRNet, load_exported

PIXEL_SIDE = 16
METRICS = ("precision_at_1", "map_at_r", "r_precision", "knn_accuracy", "roc_auc", "tar_at_far_1e-3",
           "tar_at_far_1e-4", "verification_accuracy", "verification_accuracy_std")


@torch.no_grad()
def embed(model: SimCLRNet | None, loader: EvalLoader, features: str = "backbone", amp: bool = True
          ) -> tuple[torch.Tensor, ...]:
    """L2-normalised embeddings (model, or downscaled raw pixels when model is None), labels, keys.

    `amp`: bf16 autocast on CUDA; False leaves whatever autocast the caller has set (the training loop's).
    """
    out, labels, keys = [], [], []
    if model is not None:
        model.eval()
    for batch in loader:
        x = batch["image"]
        if model is None:
            e = F.interpolate(x.float(), size=(PIXEL_SIDE, PIXEL_SIDE), mode="area").flatten(1)
            e = e - e.mean(dim=1, keepdim=True)
        else:
            amp_ctx = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
            with amp_ctx if amp else nullcontext():
                e = model.embed(x, features)
        out.append(F.normalize(e.float(), dim=1))
        labels.append(batch["label"])
        keys += batch["key"]
    return torch.cat(out), torch.cat(labels), keys


def score(emb: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    r = retrieval(emb, labels)
    v = verification(emb, labels, seed=seed)
    block = {"precision_at_1": r.precision_at_1, "map_at_r": r.map_at_r, "r_precision": r.r_precision,
             "knn_accuracy": r.knn_accuracy, "retrieval_queries": r.queries}
    block.update({k: v[k] for k in v if not k.startswith("_")})
    block["_curves"] = v["_curves"]
    return block


def report_md(report: dict) -> str:
    names = [n for n in ("model", "random_init", "pixels") if n in report]
    lines = [f"# Evaluation on `{report['split']}`: {report['n_images']} images of {report['n_identities']} identities",
             "", f"Features: {report['features']}; checkpoint: `{report['checkpoint']}`", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(f"{report[n][m]:.4f}" for n in names) + " |")
    b = report[names[0]]
    lines += ["", f"Pairs: {b['genuine_pairs']:,} genuine and {b['impostor_pairs']:,} impostor for AUC and TAR@FAR; "
              f"{b['verification_pairs']:,} balanced pairs in {b['verification_folds']} identity-disjoint folds "
              f"for accuracy. Retrieval queries: {b['retrieval_queries']:,} (identities with one image are "
              "distractors only)."]
    return "\n".join(lines) + "\n"


# -- pictures -----------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(blocks: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, b in blocks.items():
        far, tar = roc_curve(*b["_curves"])
        ax.plot(far, tar, label=f"{name} (AUC {b['roc_auc']:.3f})")
    ax.set(xscale="log", xlabel="false accept rate", ylabel="true accept rate", title="Verification ROC", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _thumb(entries: dict, key: str, side: int = 96) -> Image.Image:
    return Image.open(io.BytesIO(read_member(entries[key].members["jpg"]))).convert("RGB").resize((side, side))


def plot_retrieval(emb: torch.Tensor, labels: torch.Tensor, keys: list[str], entries: dict, path: Path,
                   queries: int = 8, k: int = 8, seed: int = 0) -> None:
    """Each row: a query, then its top-k neighbours; a wrong identity gets a red frame, a right one green."""
    has_pair = torch.nonzero((torch.bincount(labels)[labels] - 1) > 0).flatten().cpu().numpy()
    chosen = np.random.default_rng(seed).choice(has_pair, min(queries, len(has_pair)), replace=False)
    side, pad = 96, 6
    canvas = Image.new("RGB", ((k + 1) * (side + pad) + pad, len(chosen) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, q in enumerate(chosen):
        sims = emb @ emb[q]
        sims[q] = -2
        nn_idx = torch.topk(sims, k).indices.tolist()
        y = pad + row * (side + pad)
        canvas.paste(_thumb(entries, keys[q]), (pad, y))
        for col, j in enumerate(nn_idx, start=1):
            x = pad + col * (side + pad)
            canvas.paste(_thumb(entries, keys[j]), (x, y))
            colour = (0, 170, 0) if labels[j] == labels[q] else (220, 0, 0)
            draw.rectangle([x - 3, y - 3, x + side + 2, y + side + 2], outline=colour, width=3)
    canvas.save(path)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def outliers(emb: torch.Tensor, labels: torch.Tensor, keys: list[str], entries: dict, out: Path,
             share: float = 0.01) -> list[dict]:
    """Images farthest from their identity's centroid (cosine distance), with the packer's flags."""
    centroids = torch.zeros(int(labels.max()) + 1, emb.shape[1], device=emb.device).index_add_(0, labels, emb)
    centroids = F.normalize(centroids, dim=1)
    dist = 1 - (emb * centroids[labels]).sum(1)
    order = torch.argsort(dist, descending=True).tolist()
    rows = []
    for i in order:
        meta = json.loads(read_member(entries[keys[i]].members["json"])) if "json" in entries[keys[i]].members else {}
        rows.append({"key": keys[i], "path": meta.get("path", ""), "identity": int(labels[i]),
                     "distance": round(float(dist[i]), 5), "flags": ",".join(meta.get("flags", []))})
    with open(out / "outliers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    top = rows[: max(8, min(32, int(len(rows) * share)))]
    side, cols = 96, 8
    canvas = Image.new("RGB", (cols * side, ((len(top) + cols - 1) // cols) * (side + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for n, r in enumerate(top):
        x, y = (n % cols) * side, (n // cols) * (side + 14)
        canvas.paste(_thumb(entries, r["key"]), (x, y))
        draw.text((x + 2, y + side), f"{r['distance']:.2f} {r['flags'][:12]}", fill=(0, 0, 0))
    canvas.save(out / "outliers.png")
    return rows


# -- command line -------------------------------------------------------------------------------

def build_model(checkpoint: str, arch: str) -> tuple[SimCLRNet, dict]:
    if checkpoint == "none":
        torch.manual_seed(0)
        return SimCLRNet(ModelConfig(arch=arch)), {}
    return load_exported(checkpoint)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.evaluate", description=__doc__.split("\n\n")[1])
    p.add_argument("--data", type=Path, required=True, help="a folder written by `python -m pack`")
    p.add_argument("--checkpoint", required=True, help="a run folder, a .safetensors export, or 'none' (untrained)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="eval")
    p.add_argument("--features", choices=["backbone", "projection"], default="backbone")
    p.add_argument("--arch", default="resnet50", help="with --checkpoint none")
    p.add_argument("--image-size", type=int, default=None, help="default: the trained size, else the stored size")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-embeddings", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    try:
        model, meta = build_model(a.checkpoint, a.arch)
    except (FileNotFoundError, ValueError) as e:
        print(f"engine.evaluate: error: {e}", file=sys.stderr)
        return 2
    split = Split.open(a.data, a.split)
    size = a.image_size or meta.get("image_size") or split.image_size
    aug = AugmentConfig(size=size)
    loader = EvalLoader(a.data, aug, a.batch_size, a.split, device, workers=a.workers)
    a.out.mkdir(parents=True, exist_ok=True)

    blocks, embeddings = {}, {}
    torch.manual_seed(a.seed)
    untrained = SimCLRNet(model.cfg)
    for name, net in (("model", model), ("random_init", untrained), ("pixels", None)):
        if net is not None:
            net.to(device).to(memory_format=torch.channels_last)
        emb, labels, keys = embed(net, loader, a.features)
        embeddings[name] = emb
        blocks[name] = score(emb, labels, a.seed)
    entries = {e.key: e for e in split.entries()}
    report = {"split": a.split, "features": a.features, "checkpoint": str(a.checkpoint), "image_size": size,
              "n_images": len(keys), "n_identities": int(torch.unique(labels).numel()),
              **{n: {k: v for k, v in b.items() if not k.startswith("_")} for n, b in blocks.items()}}
    (a.out / "report.json").write_text(json.dumps(report, indent=1))
    (a.out / "report.md").write_text(report_md(report))
    plot_roc(blocks, a.out / "roc.png")
    plot_retrieval(embeddings["model"], labels, keys, entries, a.out / "retrieval.png", seed=a.seed)
    plot_projection(embeddings["model"], labels, a.out / "projection.png")
    outliers(embeddings["model"], labels, keys, entries, a.out)
    if a.save_embeddings:
        np.save(a.out / "embeddings.npy", embeddings["model"].cpu().numpy().astype(np.float32))
        np.save(a.out / "labels.npy", labels.cpu().numpy())
        (a.out / "keys.txt").write_text("\n".join(keys) + "\n")
    print(report_md(report))
    print("pictures: " + ", ".join(str(a.out / f) for f in ("roc.png", "retrieval.png", "projection.png",
                                                            "outliers.png")))
    return 0


__all__ = ["embed", "main", "precision_at_1", "score"]

if __name__ == "__main__":
    sys.exit(main())
