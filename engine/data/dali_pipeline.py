"""The two-view SimCLR input pipeline in DALI: one definition, GPU (`mixed` decode) or CPU.

The shard is decoded once; each view then draws its own crop, flip, jitter, grayscale and blur.
The random resized crop is written out (area and log-ratio drawn as torchvision draws them, window
placed uniformly, one antialiased resize of that window) rather than `fn.random_resized_crop`, so its
distribution provably matches the baseline's and its parameters are values tests can read. The colour
jitter is torchvision's `ColorJitter` (see `colour_jitter`), not DALI's fused `color_twist`, whose contrast
pivots on grey 128 and whose hue keeps luma.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from engine.data.augment import AugmentConfig

READER = "Reader"
CLS_BYTES = 12
"""`cls` is ASCII decimal; padded to a fixed width it batches densely, and `decode_labels` parses it on the
device in a few vector ops (a Python operator inside the pipeline would block checkpointing and threads)."""


INFO_BYTES = 512


def source_key(info) -> str:
    """The sample key from DALI's source_info of its jpg (`/path/shard.tar:offset:KEY.jpg`)."""
    text = bytes(info.cpu().numpy().tobytes()).rstrip(b"\0").decode()
    return text.rsplit(":", 1)[-1].rsplit(".", 1)[0]


def decode_labels(raw):
    """[B, CLS_BYTES] uint8 of ASCII digits, zero-padded -> [B] int64 (works on torch tensors, any device)."""
    value = raw[:, 0].long() * 0
    for i in range(raw.shape[1]):
        digit = raw[:, i].long()
        value = value.where(digit == 0, value * 10 + digit - 48)
    return value


CROP_ATTEMPTS = 10
OUTPUT_TYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "uint8": types.UINT8}


def _uniform(lo: float, hi: float):
    """Per-sample U(lo, hi); a constant when lo == hi (DALI rejects an empty range)."""
    return fn.random.uniform(values=[float(lo)]) if hi <= lo else fn.random.uniform(range=[float(lo), float(hi)])


def _factor(spread: float):
    """A brightness, contrast or saturation factor as torchvision's ColorJitter draws it."""
    return _uniform(max(0.0, 1.0 - spread), 1.0 + spread)


def random_order(n: int) -> list:
    """The step at which each of n ops runs, a uniformly random permutation as `torch.randperm` gives
    ColorJitter: each op draws a key and runs after the ops with smaller keys."""
    keys = [fn.random.uniform(range=[0.0, 1.0]) for _ in range(n)]
    return [sum(keys[j] < keys[k] for j in range(n) if j != k) for k in range(n)]


def _to_uint8(x):
    """Rounded and clipped to uint8 HWC: each jitter op ends there, as each of torchvision's does on a PIL
    image, so an op clips what the next one sees."""
    return fn.reshape(fn.cast(x, dtype=types.UINT8), layout="HWC")


def _contrast(image, factor):
    """torchvision's `adjust_contrast`: a blend with the image's mean grey (mean luma). Written as arithmetic
    because `fn.contrast(contrast_center=...)` takes its centre only from the CPU, and on the GPU the image
    is only there."""
    luma = fn.color_space_conversion(image, image_type=types.RGB, output_type=types.GRAY)
    return _to_uint8(image * factor + fn.reductions.mean(luma) * (1.0 - factor))


def _hsv_hue(image, shift):
    """torchvision's `adjust_hue`: the HSV hue moved by `shift` turns, value and HSV saturation kept.

    DALI's `fn.hue` rotates chroma in YIQ, which keeps luma where the HSV shift moves it, and no DALI op
    converts to HSV, so the shift is written out: the hue in sixths of a turn from the largest channel,
    then each channel n = 5, 3, 1 (R, G, B) as max - chroma * clamp(min(k, 4 - k), 0, 1) with
    k = (n + hue) mod 6, every operand of the mod kept non-negative.
    """
    rgb = fn.cast(image, dtype=types.FLOAT)
    r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
    top = dmath.max(dmath.max(r, g), b)
    chroma = top - dmath.min(dmath.min(r, g), b)
    r_top, g_top = top == r, (top == g) & (top != r)
    b_top = (top != r) & (top != g)
    sixths = (r_top * (g - b) + g_top * (b - r + 2.0 * chroma) + b_top * (r - g + 4.0 * chroma)) \
        / dmath.max(chroma, 1e-6)  # in [-1, 5)
    turned = sixths + 6.0 * (shift % 1.0 + 1.0)  # whole turns dropped (% keeps the sign), one added: > 0

    def channel(n: float):
        k = (turned + n) % 6.0
        return top - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)

    return _to_uint8(fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=2))


def colour_jitter(image, brightness, contrast, saturation, hue, order):
    """torchvision's `ColorJitter` on uint8 HWC images, CPU or GPU: brightness, contrast and saturation
    factors, hue shift in turns, and `order[k]`, the step at which op k (brightness, contrast, saturation,
    hue: torchvision's numbering) runs; each a number or a per-sample DataNode. Training passes its random
    draws, tests fixed ones.

    Brightness and saturation are DALI's ops: a scale, and a blend with luma (YIQ's Y); each op rounds to
    uint8 where PIL truncates (within one grey level).
    """
    ops = (lambda x: fn.brightness(x, brightness=brightness), lambda x: _contrast(x, contrast),
           lambda x: fn.saturation(x, saturation=saturation), lambda x: _hsv_hue(x, hue))
    for step in range(len(ops)):
        for k, op in enumerate(ops):  # not zip(): DALI's autograph rejects zip(strict=...)
            if order[k] == step:
                image = op(image)
    return image


def _crop_window(cfg: AugmentConfig):
    """Relative (y0, x0), (y1, x1) of a crop as torchvision draws it: area in crop_scale and log-uniform
    aspect in crop_ratio, redrawn until the window fits (10 tries), else the whole image.

    The tries are drawn at once and the first that fits is picked arithmetically (a DALI graph has no
    per-sample loop). Clamping a misfit instead of redrawing would favour large crops: measured, it
    raised the mean crop area from 0.47 to 0.55 (tests/test_data.py checks the parity).
    """
    w = h = 1.0  # the fallback (the images are square)
    for _ in range(CROP_ATTEMPTS):
        area = _uniform(*cfg.crop_scale)
        ratio = dmath.exp(_uniform(*cfg.log_ratio))
        wi, hi = dmath.sqrt(area * ratio), dmath.sqrt(area / ratio)
        fits = fn.cast((wi <= 1.0) & (hi <= 1.0), dtype=types.FLOAT)
        w = fits * wi + (1.0 - fits) * w  # built from the last try backwards: the first fit wins
        h = fits * hi + (1.0 - fits) * h
    x0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w)
    y0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h)
    return fn.stack(y0, x0), fn.stack(y0 + h, x0 + w), w * h


def view(image, cfg: AugmentConfig, dtype: types.DALIDataType):
    """One augmented view, HWC (a channels-last NCHW tensor once permuted in torch): normalised, or for a
    uint8 `dtype` the raw pixels, flipped. Returns (view, params) with the crop area and the
    flip/jitter/gray/blur draws, for tests."""
    start, end, area = _crop_window(cfg)
    out = fn.resize(image, size=[cfg.size, cfg.size], roi_start=start, roi_end=end, roi_relative=True,
                    antialias=True, interp_type=types.INTERP_LINEAR)
    jitter = fn.random.coin_flip(probability=cfg.jitter_p, dtype=types.BOOL)
    if jitter:
        out = colour_jitter(out, _factor(cfg.brightness), _factor(cfg.contrast), _factor(cfg.saturation),
                            _uniform(-cfg.hue, cfg.hue), random_order(4))
    gray = fn.random.coin_flip(probability=cfg.gray_p, dtype=types.BOOL)
    if gray:  # luma replicated, as PIL's convert("L"): fn.hsv(saturation=0) left +-1-level colour residues
        luma = fn.color_space_conversion(out, image_type=types.RGB, output_type=types.GRAY)
        out = fn.cat(luma, luma, luma, axis=2)
    blur = fn.random.coin_flip(probability=cfg.blur_p, dtype=types.BOOL)
    if blur:
        out = fn.gaussian_blur(out, window_size=cfg.blur_kernel, sigma=_uniform(*cfg.blur_sigma))
    flip = fn.random.coin_flip(probability=cfg.flip_p)
    if dtype == types.UINT8:
        out = fn.flip(out, horizontal=flip)
    else:
        out = fn.crop_mirror_normalize(out, dtype=dtype, output_layout="HWC", mirror=flip,
                                       mean=[m * 255 for m in cfg.mean], std=[s * 255 for s in cfg.std])
    return out, (area, flip, jitter, gray, blur)


@pipeline_def(enable_conditionals=True)
def simclr_pipeline(paths: Sequence[str], index_paths: Sequence[str], cfg: AugmentConfig, device: str,
                    shard_id: int, num_shards: int, shuffle: bool, initial_fill: int, output: str = "float32",
                    with_params: bool = False, with_source: bool = False, with_info: bool = False,
                    with_shape: bool = False):
    """Outputs: view1, view2 (`output`: float32 or float16 normalised, or uint8 raw pixels), the `cls`
    bytes zero-padded to CLS_BYTES (see `decode_labels`); then the crop area and flip/jitter/gray/blur
    draws of each view when `with_params`; the decoded source when `with_source`; the source info when
    `with_info`; the decoded image's shape (H, W, C) when `with_shape`, for the loader to check against the
    manifest (metadata DALI has on the CPU, on either device: it needs `exec_dynamic=True`)."""
    jpg, cls = fn.readers.webdataset(
        paths=list(paths), index_paths=list(index_paths), ext=["jpg", "cls"], missing_component_behavior="error",
        random_shuffle=shuffle, initial_fill=initial_fill, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=False, stick_to_shard=False, name=READER, dont_use_mmap=False,
    )
    image = fn.decoders.image(jpg, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                              hw_decoder_load=0.99 if device == "gpu" else 0.0)
    dtype = OUTPUT_TYPES[output]
    v1, p1 = view(image, cfg, dtype)
    v2, p2 = view(image, cfg, dtype)
    outputs = [v1, v2, fn.pad(cls, fill_value=0, shape=[CLS_BYTES])]
    if with_params:
        outputs += [*p1, *p2]
    if with_source:
        outputs.append(image)
    if with_info:  # "shard.tar:offset:..." of each sample, zero-padded, to check which samples a rank saw
        outputs.append(fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0, shape=[INFO_BYTES]))
    if with_shape:
        outputs.append(image.shape())
    return tuple(outputs)
