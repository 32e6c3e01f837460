"""engine.data: the DALI two-view pipeline (CPU here), the torch baseline, parity between them, ranks,
resume, and errors that name the broken shard."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.data import AugmentConfig, EvalLoader, LoaderConfig, ShardError, Split, TrainLoader
from engine.data.torch_pipeline import label as entry_label

from .probe_data import checker_image, ramp_image, write_split

BACKENDS = ["dali", "torch"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """203 train images (ramps and checkers, 7 labels) and 41 eval images: counts that divide by nothing."""
    root = tmp_path_factory.mktemp("probe")
    images = [ramp_image() if i % 2 else checker_image(seed=i) for i in range(203)]
    write_split(root, images, [i % 7 for i in range(203)], "train", per_shard=40)
    write_split(root, [checker_image(seed=1000 + i) for i in range(41)], [7 + i % 3 for i in range(41)], "eval")
    return root


def one_epoch(root: Path, backend: str, aug: AugmentConfig, batch: int = 16, **kw) -> list[dict]:
    cfg = LoaderConfig(backend=backend, batch_size=batch, workers=2, initial_fill=64)
    return list(TrainLoader(root, aug, cfg, with_keys=True, **kw))


def unnormalise(views: torch.Tensor, aug: AugmentConfig) -> np.ndarray:
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(aug.std).view(1, 3, 1, 1) * 255
    return (views.float() * std + mean).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_shapes_dtypes_labels(probe: Path, backend: str) -> None:
    aug = AugmentConfig(size=32)
    batches = one_epoch(probe, backend, aug, dtype=torch.bfloat16)
    assert len(batches) == (203 // 16)
    cls_of = {e.key: entry_label(e) for e in Split.open(probe).entries()}
    for b in batches:
        for v in ("view1", "view2"):
            assert b[v].shape == (16, 3, 32, 32) and b[v].dtype == torch.bfloat16
            assert b[v].is_contiguous(memory_format=torch.channels_last)
            assert b[v].float().abs().max() < 3.0, "normalised values stay in the ImageNet-normalised range"
        assert not torch.equal(b["view1"], b["view2"]), "the two views of a batch differ"
        assert b["label"].dtype == torch.int64
        assert b["label"].tolist() == [cls_of[k] for k in b["key"]], "labels belong to the samples"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_remaining_batches(probe: Path, backend: str) -> None:
    aug, cfg = AugmentConfig(size=32), LoaderConfig(backend=backend, batch_size=8, workers=2, initial_fill=64)
    full = TrainLoader(probe, aug, cfg, seed=5)
    first_epoch = [b["view1"].clone() for b in full]
    reference = [b["view1"].clone() for b in full]  # epoch 1, uninterrupted
    run = TrainLoader(probe, aug, cfg, seed=5)
    assert len([b for b in run]) == len(first_epoch)
    it = iter(run)
    head = [next(it)["view1"].clone() for _ in range(7)]
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file
    resumed = TrainLoader(probe, aug, cfg, seed=5)
    resumed.load_state_dict(state)
    tail = [b["view1"].clone() for b in resumed]
    assert len(head) + len(tail) == len(reference)
    for got, want in zip(head + tail, reference, strict=True):
        assert torch.equal(got, want)
    assert resumed.epoch == 2 and resumed.step == 0


def _rank_worker(rank: int, world: int, init: str, root: str, backend: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    loader = TrainLoader(root, AugmentConfig(size=16), LoaderConfig(backend=backend, batch_size=8, workers=1,
                                                                    initial_fill=32), rank=rank, world=world,
                         with_keys=True)
    keys, steps = [], 0
    for b in loader:
        keys += b["key"]
        steps += 1
    counts = torch.tensor([steps])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # would hang, not pass, if one rank had fewer steps
    Path(out, f"rank{rank}.json").write_text(json.dumps({"keys": keys, "steps": steps, "max": int(counts)}))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_disjoint_covering_equal_steps(probe: Path, tmp_path: Path, backend: str) -> None:
    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/store", str(probe), backend, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["steps"] == r1["steps"] == r0["max"] == (203 // 2) // 8
    assert not set(r0["keys"]) & set(r1["keys"])
    everything = {e.key for e in Split.open(probe).entries()}
    seen = set(r0["keys"]) | set(r1["keys"])
    assert len(seen) == len(r0["keys"]) + len(r1["keys"]) and seen <= everything
    assert len(everything - seen) < 2 * 8, "only the tail that makes no full batch on some rank is left out"


def test_eval_loader_sees_every_image_once_across_ranks(probe: Path) -> None:
    aug = AugmentConfig(size=32)
    keys = []
    for rank in range(3):
        for b in EvalLoader(probe, aug, batch_size=8, rank=rank, world=3, workers=0):
            assert b["image"].shape[1:] == (3, 32, 32)
            keys += b["key"]
    assert sorted(keys) == sorted(e.key for e in Split.open(probe, "eval").entries())


def test_broken_or_missing_shard_is_named(probe: Path, tmp_path: Path) -> None:
    copy = tmp_path / "d"
    shutil.copytree(probe, copy)
    shard = copy / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match="train-000002.tar.*truncated"):
        TrainLoader(copy, AugmentConfig(size=32), LoaderConfig(backend="dali", batch_size=8))
    shard.unlink()
    with pytest.raises(ShardError, match="train-000002.tar is missing"):
        TrainLoader(copy, AugmentConfig(size=32), LoaderConfig(backend="torch", batch_size=8))


# -- augmentation parity: the same config gives the same distributions on both backends ----------

def views_of(probe: Path, backend: str, aug: AugmentConfig, kind: str) -> np.ndarray:
    """Unnormalised views (N, H, W, 3) of the probe images of one kind (ramps or checkers)."""
    entries = {e.key: i for i, e in enumerate(Split.open(probe).entries())}
    out = []
    for epoch_batch in one_epoch(probe, backend, aug, batch=8):
        for v in ("view1", "view2"):
            views = unnormalise(epoch_batch[v], aug)
            for k, key in enumerate(epoch_batch["key"]):
                if (entries[key] % 2 == 1) == (kind == "ramp"):
                    out.append(views[k])
    return np.stack(out)


def parity(probe: Path, aug: AugmentConfig, kind: str, stat) -> dict[str, np.ndarray]:
    return {b: np.array([stat(v) for v in views_of(probe, b, aug, kind)]) for b in BACKENDS}


OFF = AugmentConfig(size=32, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def test_parity_crop_area_and_flip_rate(probe: Path) -> None:
    def area(v: np.ndarray) -> float:
        return float(np.ptp(v[..., 0]) / 255 * np.ptp(v[..., 1]) / 255)

    def flipped(v: np.ndarray) -> float:
        return float(v[:, 0, 0].mean() > v[:, -1, 0].mean())

    areas = parity(probe, OFF, "ramp", area)
    flips = parity(probe, OFF, "ramp", flipped)
    # area ~ U(0.08, 1) has mean 0.54; the R/G range of a 32 px view slightly undercounts both sides
    for b in BACKENDS:
        assert 0.42 < areas[b].mean() < 0.60, (b, areas[b].mean())
        assert abs(flips[b].mean() - 0.5) < 0.1, (b, flips[b].mean())
    assert abs(areas["dali"].mean() - areas["torch"].mean()) < 0.05
    assert abs(np.median(areas["dali"]) - np.median(areas["torch"])) < 0.07


def test_parity_grayscale_share(probe: Path) -> None:
    aug = replace(OFF, gray_p=0.2, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))

    def gray(v: np.ndarray) -> float:
        return float(np.abs(v[..., 0] - v[..., 1]).mean() + np.abs(v[..., 1] - v[..., 2]).mean() < 2.0)

    shares = parity(probe, aug, "checker", gray)
    for b in BACKENDS:
        assert abs(shares[b].mean() - 0.2) < 0.08, (b, shares[b].mean())


def test_parity_blur_share(probe: Path) -> None:
    aug = replace(OFF, size=96, blur_p=0.5, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)

    def detail(v: np.ndarray) -> float:
        return float(np.abs(np.diff(v.mean(axis=2), axis=1)).mean())

    energy = parity(probe, aug, "checker", detail)
    for b in BACKENDS:
        sharp = np.median(energy[b][energy[b] >= np.percentile(energy[b], 75)])
        blurred = (energy[b] < 0.8 * sharp).mean()
        # sigma ~ U(0.1, 2): below ~0.4 a 9 px kernel barely softens 2 px cells, so ~0.5 x 0.85 count
        assert 0.33 < blurred < 0.52, (b, blurred)
        energy[b] = blurred
    assert abs(energy["dali"] - energy["torch"]) < 0.08


def test_parity_colour_jitter_shifts(probe: Path) -> None:
    aug = replace(OFF, jitter_p=0.8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))

    def brightness(v: np.ndarray) -> float:
        return float(v.mean())

    def saturation(v: np.ndarray) -> float:
        return float(((v.max(axis=2) - v.min(axis=2)) / np.maximum(v.max(axis=2), 1)).mean())

    b = parity(probe, aug, "checker", brightness)
    s = parity(probe, aug, "checker", saturation)
    # DALI applies brightness, contrast, saturation, hue in one fused op, in a fixed
    # order; torchvision in a random order: the distributions agree to these tolerances
    assert abs(b["dali"].mean() - b["torch"].mean()) < 10
    assert 0.75 < b["dali"].std() / b["torch"].std() < 1.33
    assert abs(s["dali"].mean() - s["torch"].mean()) < 0.06
    assert 0.7 < s["dali"].std() / s["torch"].std() < 1.43


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU twin: the tests above")
def test_dali_gpu_batches(probe: Path) -> None:
    aug = AugmentConfig(size=32)
    cfg = LoaderConfig(backend="dali", batch_size=16, workers=2, initial_fill=64)
    b = next(iter(TrainLoader(probe, aug, cfg, device="cuda", dtype=torch.bfloat16)))
    assert b["view1"].is_cuda and b["view1"].dtype == torch.bfloat16 and b["view1"].shape == (16, 3, 32, 32)
    assert b["view1"].is_contiguous(memory_format=torch.channels_last)
