"""python -m engine.evaluate --checkpoint CKPT [--data PACKED] [--bench PATH ...] [--flip] --out DIR

How well do the embeddings separate identities never trained on? On held-out identities of a packed
split (`--data`) and on the standard verification benchmarks (`--bench`: insightface .bin files, LFW
pairs.txt), the model is compared with the same architecture untrained and with raw pixels, on the same
images. Writes report.json and report.md; with --data also roc.png, retrieval.png, projection.png,
outliers.png and outliers.csv; with --bench roc_<bench>.png. docs/evaluation.md defines every figure.

The embedding (engine.embed), the figures (engine.metrics, engine.outliers) and the report (engine.report)
are libraries; this is their command line. torch is imported only once the arguments are known to be good,
so --help and a mistyped flag answer at once.
"""

from __future__ import annotations

import io
import sys
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING

from base.cli import OneLineParser, non_negative, positive
from base.errors import UsageError, entry_point
from base.files import ensure_writable, write_atomic
from engine.archs import FEATURE_DIMS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engine.embed import LabelledSplit, Nets
    from engine.pairsets import PairSet

PROG = "python -m engine.evaluate"
DEFAULT_BENCH_SIZE = 112
"""Input side when neither the checkpoint, --image-size nor --data says: the .bin sets' aligned crops."""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", required=True,
                   help="a faceclr run folder or export, a training checkpoint folder, a ResNet state dict "
                        "(.safetensors or .pth, torchvision keys, optionally under 'backbone.'), or 'none' "
                        "(random init)")
    p.add_argument("--data", type=Path, help="a folder written by `python -m pack`: score its held-out identities")
    p.add_argument("--bench", type=Path, action="append", default=[],
                   help="an insightface .bin or an LFW pairs.txt (repeatable)")
    p.add_argument("--images", type=Path, help="LFW image folder (name/name_NNNN.jpg); default: beside pairs.txt")
    p.add_argument("--flip", action="store_true", help="embed each image plus its horizontal mirror")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="eval")
    p.add_argument("--features", choices=["backbone", "projection"], default="backbone")
    p.add_argument("--arch", choices=list(FEATURE_DIMS),
                   help="the checkpoint's architecture (default: what the checkpoint says or its tensors show; "
                        "required with --checkpoint none)")
    p.add_argument("--image-size", type=positive(int), default=None,
                   help="default: the trained size, else the packed size, else 112")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--batch-size", type=positive(int), default=128)
    p.add_argument("--workers", type=non_negative(int), default=2)
    p.add_argument("--save-embeddings", action="store_true",
                   help="the model's embeddings: embeddings.npy, labels.npy, keys.txt (--data); "
                        "embeddings_<bench>.npy, one row per distinct image (--bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the split's shards against the manifest's sizes and sha256 (the check's "
                        "answer is kept in OUT/verified.json)")
    return p


def write_npy(path: Path, array: np.ndarray) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())


def open_pairsets(paths: list[Path], images: Path | None) -> list[PairSet]:
    """Every --bench file read and checked before anything is embedded; their names key the report."""
    from engine.pairsets import open_pairset

    pairsets = [open_pairset(path, images) for path in paths]
    names = [ps.name for ps in pairsets]
    if len(set(names)) != len(names):
        raise UsageError(f"two --bench files share the name '{max(names, key=names.count)}' (rename one)")
    return pairsets


def split_section(a: Namespace, nets: Nets, labelled: LabelledSplit, size: int, device: torch.device) -> dict:
    """The held-out identities: the report's section for them, and its pictures and CSV in --out."""
    import numpy as np
    import torch

    from engine.data import AugmentConfig, EvalLoader
    from engine.data.torch_pipeline import decode
    from engine.embed import embed_all
    from engine.metrics import score_split
    from engine.outliers import outlier_report
    from engine.report import plot_projection, plot_retrieval, plot_roc, public, write_outliers

    loader = EvalLoader(a.data, AugmentConfig(size=size), a.batch_size, a.split, device, workers=a.workers)
    embeddings, labels, keys = embed_all(nets, loader, a.features, flip=a.flip)
    blocks = {name: score_split(emb, labels, a.seed) for name, emb in embeddings.items()}
    labels = labels.cpu()
    by_key = {e.key: e for e in labelled.entries}
    ordered = [by_key[k] for k in keys]
    thumb = lambda i: decode(ordered[i])
    rows, outliers = outlier_report(embeddings, labels, ordered)
    write_outliers(rows, thumb, a.out)
    plot_roc(blocks, a.out / "roc.png", title=f"Verification ROC: split '{a.split}'")
    plot_retrieval(embeddings["model"], labels, thumb, a.out / "retrieval.png", seed=a.seed)
    plot_projection(embeddings["model"], labels, a.out / "projection.png")
    if a.save_embeddings:
        write_npy(a.out / "embeddings.npy", embeddings["model"].cpu().numpy().astype(np.float32))
        write_npy(a.out / "labels.npy", labels.numpy())
        write_atomic(a.out / "keys.txt", "\n".join(keys) + "\n")
    return {"split": a.split, "n_images": len(keys), "n_identities": int(torch.unique(labelled.labels).numel()),
            **{n: public(b) for n, b in blocks.items()}, "outliers": outliers}


def bench_section(a: Namespace, nets: Nets, ps: PairSet, size: int, device: torch.device) -> dict:
    """One benchmark: the report's section for it, and its ROC picture in --out."""
    import numpy as np

    from engine.embed import embed_pairset
    from engine.metrics import score_pairs
    from engine.report import plot_roc, public

    embs = embed_pairset(nets, ps, size, a.features, a.flip, device, a.batch_size, a.workers)
    blocks = {name: score_pairs(e, ps.pairs, ps.issame, ps.fold) for name, e in embs.items()}
    plot_roc(blocks, a.out / f"roc_{ps.name}.png", title=f"{ps.name}: verification ROC")
    if a.save_embeddings:
        write_npy(a.out / f"embeddings_{ps.name}.npy", embs["model"].cpu().numpy().astype(np.float32))
    return {"path": str(ps.path), "layout": ps.layout, "images": len(ps.images),
            "folds_from": "10 blocks in file order" if ps.layout.endswith(".bin") else "the file's sets",
            **{n: public(b) for n, b in blocks.items()}}


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.data is None and not a.bench:
        raise UsageError("nothing to evaluate: pass --data (a packed folder) and/or --bench (a .bin or pairs.txt)")
    import torch

    from engine.embed import load_model, open_split, read_split, with_references
    from engine.report import write_report

    loaded = load_model(a.checkpoint, a.arch)
    if a.features == "projection" and not loaded.has_head:
        raise UsageError(f"--features projection: {a.checkpoint} holds a backbone only, no projection head (use "
                         "--features backbone)")
    split = open_split(a.data, a.split) if a.data is not None else None
    pairsets = open_pairsets(a.bench, a.images)
    ensure_writable(a.out)
    labelled = read_split(split, not a.no_verify, a.out / "verified.json", a.workers) if split else None

    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    size = a.image_size or loaded.meta.get("image_size") or (split.image_size if split else DEFAULT_BENCH_SIZE)
    nets = with_references(loaded.net, device, a.seed)
    report = {"checkpoint": str(a.checkpoint), "checkpoint_form": loaded.source, "arch": loaded.net.cfg.arch,
              "features": a.features, "image_size": size, "flip": a.flip}
    if loaded.meta.get("step") is not None:
        report["trained_steps"] = loaded.meta["step"]
    if labelled is not None:
        report.update(split_section(a, nets, labelled, size, device))
    if pairsets:
        report["benchmarks"] = {ps.name: bench_section(a, nets, ps, size, device) for ps in pairsets}
    md = write_report(a.out, report)  # last: a report.json beside the pictures says they are all written
    print(md)
    print(f"report: {a.out / 'report.json'}, {a.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
