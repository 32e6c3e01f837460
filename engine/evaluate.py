"""python -m engine.evaluate --checkpoint CKPT [--data PACKED] [--bench PATH ...] [--flip] --out DIR

How well do the embeddings separate identities never trained on? On held-out identities of a packed
split (`--data`) and on the standard verification benchmarks (`--bench`: insightface .bin files, LFW
pairs.txt), the model is compared with the same architecture untrained and with raw pixels, on the same
images. Writes report.json and report.md; with --data also roc.png, retrieval.png, projection.png,
outliers.png and outliers.csv. docs/evaluation.md defines every figure.
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from base.cli import OneLineParser, positive
from base.errors import UsageError, entry_point
from base.files import ensure_writable, write_atomic
from engine.data import AugmentConfig, EvalLoader, ShardError, Split
from engine.data.shards import Entry, read_member
from engine.data.torch_pipeline import decode as decode_entry
from engine.data.torch_pipeline import eval_transform, label
from engine.metrics import pair_distances, pair_verification, precision_at_1, retrieval, verification
from engine.model import FEATURE_DIMS, CheckpointError, Loaded, ModelConfig, SimCLRNet, load_checkpoint
from engine.outliers import FLAGS, INTERVALS, SCORING, enrichment, outlier_scores, ranking
from engine.pairsets import PairSet, PairSetError, decode, open_pairset
from engine.report import plot_outliers, plot_projection, plot_retrieval, plot_roc, report_md
from pack.verify import ensure_verified, find_undecodable

PROG = "python -m engine.evaluate"
PIXEL_SIDE = 16
DEFAULT_BENCH_SIZE = 112
"""Input side when neither the checkpoint, --image-size nor --data says: the .bin sets' aligned crops."""


def _embed_batch(model: SimCLRNet | None, x: torch.Tensor, features: str, amp: bool) -> torch.Tensor:
    if model is None:
        e = F.interpolate(x.float(), size=(PIXEL_SIDE, PIXEL_SIDE), mode="area").flatten(1)
        return e - e.mean(dim=1, keepdim=True)
    amp_ctx = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with amp_ctx if amp else nullcontext():
        return model.embed(x, features).float()


def embed_tensor(model: SimCLRNet | None, x: torch.Tensor, features: str = "backbone", amp: bool = True,
                 flip: bool = False) -> torch.Tensor:
    """L2-normalised embeddings of one batch; with `flip`, of the image's plus its mirror's raw embedding."""
    e = _embed_batch(model, x, features, amp)
    if flip:
        e = e + _embed_batch(model, x.flip(3), features, amp)
    return F.normalize(e.float(), dim=1)


@torch.no_grad()
def embed(model: SimCLRNet | None, loader: EvalLoader, features: str = "backbone", amp: bool = True,
          flip: bool = False) -> tuple[torch.Tensor, ...]:
    """L2-normalised embeddings (model, or downscaled raw pixels when model is None), labels, keys.

    `amp`: bf16 autocast on CUDA; False leaves whatever autocast the caller has set (the training loop's).
    """
    embeddings, labels, keys = embed_all({"model": model}, loader, features, amp, flip)
    return embeddings["model"], labels, keys


@torch.no_grad()
def embed_all(models: dict[str, SimCLRNet | None], loader: EvalLoader, features: str = "backbone",
              amp: bool = True, flip: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """`embed` for several networks over one pass of the loader (each image read and decoded once)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels, keys = [], []
    for model in models.values():
        if model is not None:
            model.eval()
    for batch in loader:
        for name, model in models.items():
            out[name].append(embed_tensor(model, batch["image"], features, amp, flip))
        labels.append(batch["label"])
        keys += batch["key"]
    return {name: torch.cat(e) for name, e in out.items()}, torch.cat(labels), keys


def score(emb: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Identity metrics of one embedding of a labelled split (retrieval and verification)."""
    r = retrieval(emb, labels)
    v = verification(emb, labels, seed=seed)
    block = {"precision_at_1": r.precision_at_1, "map_at_r": r.map_at_r, "r_precision": r.r_precision,
             "knn_accuracy": r.knn_accuracy, "retrieval_queries": r.queries}
    block.update({k: v[k] for k in v if not k.startswith("_")})
    block["_curves"] = v["_curves"]
    return block


def _public(block: dict) -> dict:
    return {k: v for k, v in block.items() if not k.startswith("_")}


# -- the verification benchmarks --------------------------------------------------------------------

class _PairImages(torch.utils.data.Dataset):
    """A benchmark's images through the eval loader's preprocessing; (image, ok) so a bad one is named once."""

    def __init__(self, images: list, size: int):
        self.images, self.transform = images, eval_transform(AugmentConfig(size=size))
        self.blank = torch.zeros(3, size, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.transform(decode(self.images[i])), True
        except ValueError:
            return self.blank, False


@torch.no_grad()
def embed_pairset(nets: dict[str, SimCLRNet | None], ps: PairSet, size: int, features: str, flip: bool,
                  device: torch.device, batch_size: int, workers: int) -> dict[str, torch.Tensor]:
    """Every image of the benchmark embedded once per network (one decode per image for all of them)."""
    loader = torch.utils.data.DataLoader(_PairImages(ps.images, size), batch_size=batch_size, num_workers=workers)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in nets}
    for n, (x, ok) in enumerate(loader):
        if not bool(ok.all()):
            k = n * batch_size + int(torch.nonzero(~ok)[0])
            where = f"{ps.images[k]}" if isinstance(ps.images[k], Path) else "in the file"
            try:
                decode(ps.images[k])
            except ValueError as e:
                raise UsageError(f"--bench {ps.path}: image {k} ({where}) cannot be decoded: {e} (a damaged benchmark: "
                                 "fetch it again)") from None
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        for name, net in nets.items():
            out[name].append(embed_tensor(net, x, features, flip=flip))
    return {name: torch.cat(e) for name, e in out.items()}


def score_pairset(emb: torch.Tensor, ps: PairSet) -> dict:
    return pair_verification(pair_distances(emb[ps.pairs[:, 0]], emb[ps.pairs[:, 1]]), ps.issame, ps.fold)


# -- the identity split ---------------------------------------------------------------------------

def _flags(entry: Entry) -> tuple[str, list[str]]:
    if "json" not in entry.members:
        return "", []
    meta = json.loads(read_member(entry.members["json"]))
    return meta.get("path", ""), list(meta.get("flags", []))


def outlier_report(blocks: dict[str, torch.Tensor], labels: torch.Tensor, entries: list[Entry], out: Path) -> dict:
    """Outlier ranking (model) into outliers.csv and outliers.png; flag enrichment for model and random init."""
    info = [_flags(e) for e in entries]
    flags = [f for _, f in info]
    scores = {name: outlier_scores(blocks[name], labels) for name in ("model", "random_init")}
    order = ranking(scores["model"])
    rows = [{"rank": r + 1, "index": int(i), "key": entries[i].key, "path": info[i][0], "identity": int(labels[i]),
             "score": round(float(scores["model"][i]), 5), "flags": ",".join(flags[i])} for r, i in enumerate(order)]
    with open(out / "outliers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "index"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot_outliers(rows, lambda i: decode_entry(entries[i]), out / "outliers.png",
                  count=max(16, min(48, len(rows) // 100)))
    counts = {name: sum(name in flags[i] for i in order) for name in FLAGS}  # over ranked images, as the table
    return {"scoring": SCORING, "intervals": INTERVALS, "ranked": len(order), "flag_counts": counts,
            "enrichment": {name: enrichment(s, flags) for name, s in scores.items()}}


def open_split(data: Path, split: str) -> tuple[Split, list[Entry], torch.Tensor]:
    """The split, its entries and their labels; refused at once when it cannot be scored."""
    try:
        s = Split.open(data, split)
        entries = s.entries()
        labels = torch.tensor([label(e) for e in entries], dtype=torch.long)
    except (ShardError, OSError, ValueError) as e:
        raise UsageError(f"--data {data}: {e} (pass the --out folder of `python -m pack`)") from None
    ids, counts = torch.unique(labels, return_counts=True)
    if len(ids) < 2:
        raise UsageError(f"split '{split}' of {data} has {len(ids)} identit{'y' if len(ids) == 1 else 'ies'}: "
                         "identity metrics need at least two (pack with a larger --eval-identities, or pick another "
                         "--split)")
    if int(counts.max()) < 2:
        raise UsageError(f"split '{split}' of {data}: no identity has two images, so nothing can be retrieved or "
                         "verified (pack with --min-images 2 or more)")
    return s, entries, labels


# -- command line -----------------------------------------------------------------------------------

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
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-embeddings", action="store_true",
                   help="the model's embeddings: embeddings.npy, labels.npy, keys.txt (--data); "
                        "embeddings_<bench>.npy, one row per distinct image (--bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the split's shards against the manifest's sizes and sha256 (the check's "
                        "answer is kept in OUT/verified.json)")
    return p


def load_model(checkpoint: str, arch: str | None) -> Loaded:
    """The network to score, or one line and exit 2."""
    if checkpoint == "none":
        if arch is None:
            raise UsageError(f"--checkpoint none needs --arch (one of {', '.join(FEATURE_DIMS)})")
        torch.manual_seed(0)
        return Loaded(SimCLRNet(ModelConfig(arch=arch)), True, {}, "none: random init")
    try:
        return load_checkpoint(checkpoint, arch)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.data is None and not a.bench:
        raise UsageError("nothing to evaluate: pass --data (a packed folder) and/or --bench (a .bin or pairs.txt)")
    if a.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {a.workers}")
    loaded = load_model(a.checkpoint, a.arch)
    if a.features == "projection" and not loaded.has_head:
        raise UsageError(f"--features projection: {a.checkpoint} holds a backbone only, no projection head (use "
                         "--features backbone)")
    split = entries = labels = None
    if a.data is not None:
        split, entries, labels = open_split(a.data, a.split)
    pairsets = []
    for path in a.bench:
        try:
            pairsets.append(open_pairset(path, a.images))
        except PairSetError as e:
            raise UsageError(str(e)) from None
    names = [ps.name for ps in pairsets]
    if len(set(names)) != len(names):
        raise UsageError(f"two --bench files share the name '{max(names, key=names.count)}' (rename one)")
    ensure_writable(a.out)
    if split is not None and not a.no_verify:
        try:
            ensure_verified(a.data, [a.split], a.out / "verified.json", workers=max(1, a.workers),
                            progress=sys.stderr.isatty())
        except ShardError as e:
            raise UsageError(f"{e}; --no-verify skips the check") from None

    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    size = a.image_size or loaded.meta.get("image_size") or (split.image_size if split else DEFAULT_BENCH_SIZE)
    torch.manual_seed(a.seed)
    nets: dict[str, SimCLRNet | None] = {"model": loaded.net, "random_init": SimCLRNet(loaded.net.cfg), "pixels": None}
    for net in nets.values():
        if net is not None:
            net.to(device).to(memory_format=torch.channels_last).eval()
    report = {"checkpoint": str(a.checkpoint), "checkpoint_form": loaded.source, "arch": loaded.net.cfg.arch,
              "features": a.features, "image_size": size, "flip": a.flip}
    if loaded.meta.get("step") is not None:
        report["trained_steps"] = loaded.meta["step"]

    if split is not None:
        loader = EvalLoader(a.data, AugmentConfig(size=size), a.batch_size, a.split, device, workers=a.workers)
        try:
            embeddings, emb_labels, keys = embed_all(nets, loader, a.features, flip=a.flip)
        except OSError as e:  # PIL's decode failures, re-raised by the DataLoader without the sample's name
            bad = find_undecodable(a.data, a.split, limit=1)
            raise UsageError(f"{bad[0] if bad else e} (python -m pack verify --data {a.data} --decode lists every bad "
                             "sample)") from None
        blocks = {name: score(emb, emb_labels, a.seed) for name, emb in embeddings.items()}
        report.update({"split": a.split, "n_images": len(keys), "n_identities": int(torch.unique(labels).numel()),
                       **{n: _public(b) for n, b in blocks.items()}})
        emb_labels = emb_labels.cpu()
        by_key = {e.key: e for e in entries}
        ordered = [by_key[k] for k in keys]
        report["outliers"] = outlier_report(embeddings, emb_labels, ordered, a.out)
        plot_roc(blocks, a.out / "roc.png")
        thumb = lambda i: decode_entry(ordered[i])
        plot_retrieval(embeddings["model"], emb_labels, thumb, a.out / "retrieval.png", seed=a.seed)
        plot_projection(embeddings["model"], emb_labels, a.out / "projection.png")
        if a.save_embeddings:
            np.save(a.out / "embeddings.npy", embeddings["model"].cpu().numpy().astype(np.float32))
            np.save(a.out / "labels.npy", emb_labels.numpy())
            (a.out / "keys.txt").write_text("\n".join(keys) + "\n")

    if pairsets:
        report["benchmarks"] = {}
    for ps in pairsets:
        embs = embed_pairset(nets, ps, size, a.features, a.flip, device, a.batch_size, a.workers)
        bench_blocks = {name: score_pairset(e, ps) for name, e in embs.items()}
        report["benchmarks"][ps.name] = {
            "path": str(ps.path), "layout": ps.layout, "images": len(ps.images),
            "folds_from": "10 blocks in file order" if ps.layout.endswith(".bin") else "the file's sets",
            **{n: _public(b) for n, b in bench_blocks.items()}}
        plot_roc(bench_blocks, a.out / f"roc_{ps.name}.png", title=f"{ps.name}: verification ROC")
        if a.save_embeddings:
            np.save(a.out / f"embeddings_{ps.name}.npy", embs["model"].cpu().numpy().astype(np.float32))

    write_atomic(a.out / "report.json", json.dumps(report, indent=1).encode())
    md = report_md(report)
    write_atomic(a.out / "report.md", md.encode())
    print(md)
    print(f"report: {a.out / 'report.json'}, {a.out / 'report.md'}")
    return 0


__all__ = ["embed", "embed_tensor", "main", "open_split", "precision_at_1", "score"]

if __name__ == "__main__":
    sys.exit(main())
