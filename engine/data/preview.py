"""python -m engine.data.preview --data OUT --out grid.png [--device cpu] [--loader dali|torch]

A PNG of 16 samples, each as source | view 1 | view 2, so a person can see the augmentations are right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.data.augment import AugmentConfig
from engine.data.shards import Split


def _to_uint8(view: torch.Tensor, aug: AugmentConfig) -> np.ndarray:
    """A normalised CHW (or HWC) view back to HxWx3 uint8."""
    v = view.float().cpu()
    if v.shape[0] != 3:
        v = v.permute(2, 0, 1)
    v = v * torch.tensor(aug.std).view(3, 1, 1) + torch.tensor(aug.mean).view(3, 1, 1)
    return (v.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def triplets(data: Path, loader: str, device: str, aug: AugmentConfig, n: int = 16, seed: int = 0):
    """n (source, view1, view2) triplets of uint8 images."""
    split = Split.open(data, "train")
    if loader == "torch":
        from engine.data.torch_pipeline import TwoViews

        ds = TwoViews(split.entries()[:n], aug, seed, with_source=True)
        return [(item[3].permute(1, 2, 0).numpy(), _to_uint8(item[0], aug), _to_uint8(item[1], aug))
                for item in (ds[(i, 0)] for i in range(n))]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.data.preview", description=__doc__.split("\n\n")[1])
    p.add_argument("--data", type=Path, required=True, help="a folder written by `python -m pack`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--loader", choices=["dali", "torch"], default="dali")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    aug = AugmentConfig(size=a.size)
    rows = triplets(a.data, a.loader, a.device, aug, seed=a.seed)
    title = f"source | view 1 | view 2   ({a.loader} loader, {a.device}, {a.size}px, SimCLR defaults)"
    grid(rows, title=title).save(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
