"""The tile table and the split plan: every launch's blocks agree with the split, and the split covers the sweep."""

from __future__ import annotations

import pytest

from kernels import tiles

KERNELS = ("fwd", "bwd_rows", "bwd_cols")
DIMS = (1, 8, 16, 17, 32, 64, 100, 128, 129, 200, 256, 257, 512, 700, 1024, 2047, 2048)


def swept_block(kernel: str, tile: tiles.Tile) -> int:
    return tile.block_m if kernel == "bwd_cols" else tile.block_n


@pytest.mark.parametrize("dtype", tiles.OPERAND_DTYPES)
@pytest.mark.parametrize("d", DIMS)
def test_every_tile_fits_the_split_and_covers_d(dtype: str, d: int) -> None:
    for kernel in KERNELS:
        choices = tiles.configs(kernel, dtype, d)
        assert choices and len(set(choices)) == len(choices)
        assert {swept_block(kernel, t) for t in choices} == {swept_block(kernel, choices[0])}
        for t in choices:
            assert tiles.SPLIT_ALIGN % swept_block(kernel, t) == 0
            assert t.block_k >= 16 and t.block_d >= 16  # tl.dot needs K >= 16
            if t.one_chunk:
                assert t.block_k == t.block_d >= d
            else:
                assert t.block_k < d


def test_tiles_refuse_what_they_do_not_serve() -> None:
    with pytest.raises(ValueError, match="d=2049"):
        tiles.configs("fwd", "bfloat16", tiles.MAX_D + 1)
    with pytest.raises(ValueError, match="float64"):
        tiles.configs("fwd", "float64", 128)
    with pytest.raises(ValueError, match="block_k must equal block_d"):
        tiles.Tile(64, 64, 64, 128, True, 4, 3)


@pytest.mark.parametrize("owned", [1, 4, 8, 16, 64, 512])
@pytest.mark.parametrize("swept", [1, 63, 64, 65, 256, 512, 1000, 4096, 32768])
@pytest.mark.parametrize("sms", [4, 108, 132])
def test_split_covers_the_sweep_once(owned: int, swept: int, sms: int) -> None:
    split = tiles.plan_split(owned, swept, sms)
    assert split.count >= 1 and split.length % tiles.SPLIT_ALIGN == 0
    assert (split.count - 1) * split.length < swept <= split.count * split.length  # no empty split, none missing
    stretches = -(-swept // tiles.SPLIT_ALIGN)
    assert owned * split.count >= min(tiles.PROGRAMS_PER_SM * sms, owned * stretches) * 0.5


def test_training_batches_spread_over_an_h100() -> None:
    """2B = 512 anchors (8 blocks of 64) against 512 or 4096 candidates on 132 SMs: 8 programs without the
    split; with it, one per 64-candidate tile at W = 1 and about 2 per SM at W = 8 (splits of 128)."""
    assert tiles.plan_split(8, 512, 132) == tiles.Split(8, 64)
    assert tiles.plan_split(8, 4096, 132) == tiles.Split(32, 128)
    assert tiles.plan_split(512, 4096, 132) == tiles.Split(1, 4096)  # already 512 programs: no split
