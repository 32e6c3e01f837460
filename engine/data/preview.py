"""python -m engine.data.preview --data OUT --out grid.png [--device cpu] [--loader dali|torch] [--count 16]

A PNG of the first samples of a split, each as source | view 1 | view 2, so a person can see the
augmentations are right (the training's own view code: DALI's pipeline, or the baseline's PIL transforms).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from base.cli import OneLineParser
from base.errors import UsageError, entry_point
from base.files import ensure_writable, write_png
from engine.config import MAX_JITTER_STRENGTH, Loader, concrete, no_dali
from engine.data.augment import AugmentConfig
from engine.data.shards import Split

PROG = "python -m engine.data.preview"


def _to_uint8(view: torch.Tensor, aug: AugmentConfig) -> np.ndarray:
    """A normalised CHW (or HWC) view back to HxWx3 uint8."""
    v = view.float().cpu()
    if v.shape[0] != 3:
        v = v.permute(2, 0, 1)
    v = v * torch.tensor(aug.std).view(3, 1, 1) + torch.tensor(aug.mean).view(3, 1, 1)
    return (v.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def triplets(split: Split, loader: str, device: str, aug: AugmentConfig, n: int = 16, seed: int = 0):
    """n (source, view1, view2) triplets of uint8 images."""
    if loader == "torch":
        from engine.data.torch_pipeline import preview_views

        return preview_views(split, aug, n, seed)
    from engine.data.dali_pipeline import simclr_pipeline

    gpu = device == "cuda"
    pipe = simclr_pipeline(split.tars, split.indexes, aug, "gpu" if gpu else "cpu", 0, 1, shuffle=False, initial_fill=1,
                           output="float32", with_source=True, batch_size=n, num_threads=2,
                           device_id=0 if gpu else None, seed=seed)
    pipe.build()
    v1, v2, _, source = pipe.run()
    if gpu:
        v1, v2, source = v1.as_cpu(), v2.as_cpu(), source.as_cpu()
    return [(np.array(source.at(i)), _to_uint8(torch.from_numpy(np.array(v1.at(i))), aug),
             _to_uint8(torch.from_numpy(np.array(v2.at(i))), aug)) for i in range(n)]


def grid(rows: list[tuple[np.ndarray, ...]], cell: int = 128, title: str = "") -> Image.Image:
    cols = 4  # four triplets per row
    pad, head = 6, 24
    width = cols * (3 * cell + pad)
    height = head + ((len(rows) + cols - 1) // cols) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(canvas).text((6, 6), title, fill=(0, 0, 0))
    for i, trip in enumerate(rows):
        x0 = (i % cols) * (3 * cell + pad)
        y0 = head + (i // cols) * (cell + pad)
        for j, img in enumerate(trip):
            canvas.paste(Image.fromarray(img).resize((cell, cell)), (x0 + j * cell, y0))
    return canvas


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    from engine.data.loader import dali_available

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[1])
    p.add_argument("--data", type=Path, required=True, help="a folder written by `python -m pack`")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where DALI runs")
    p.add_argument("--loader", choices=concrete(Loader), default="dali")
    p.add_argument("--count", type=int, default=16, help="samples shown (default 16)")
    p.add_argument("--size", type=int, default=None, help="view side in pixels (default: the shards' size)")
    p.add_argument("--crop-min-area", type=float, default=0.08, help="as the training flag (SimCLR: 0.08)")
    p.add_argument("--jitter-strength", type=float, default=1.0, help="as the training flag (SimCLR: 1.0)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.count < 1 or (a.size is not None and a.size < 8) or not 0 < a.crop_min_area <= 1
            or not 0 <= a.jitter_strength <= MAX_JITTER_STRENGTH):
        raise UsageError("--count must be at least 1, --size at least 8, --crop-min-area in (0, 1], "
                         f"--jitter-strength in [0, {MAX_JITTER_STRENGTH}]")
    split = Split.open(a.data, a.split)
    if a.count > split.samples:
        raise UsageError(f"--count {a.count} is larger than the {a.split} split ({split.samples} samples)")
    if a.loader == "dali" and not dali_available():
        raise UsageError(no_dali("--loader torch"))
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible (use --device cpu)")
    if a.out.suffix.lower() != ".png" or not a.out.parent.is_dir():
        raise UsageError(f"--out {a.out} must be a .png in an existing folder")
    ensure_writable(a.out.parent)
    size = a.size or split.image_size
    aug = AugmentConfig(size=size, crop_scale=(a.crop_min_area, 1.0), strength=a.jitter_strength)
    rows = triplets(split, a.loader, a.device, aug, n=a.count, seed=a.seed)
    title = (f"source | view 1 | view 2   ({a.loader} loader, {a.device}, {size}px, crop area >= "
             f"{a.crop_min_area:g}, jitter {a.jitter_strength:g})")
    write_png(grid(rows, title=title), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
