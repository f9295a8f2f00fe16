"""The LIBERO model image of OpenVLA-OFT checkpoints, reproduced in numpy without TensorFlow.

The OpenVLA-OFT LIBERO evaluation and its RL successors (openvla-oft `experiments/robot/libero/libero_utils.py`
and `robot_utils.py`, SimpleVLA-RL `verl/utils/libero_utils.py` get_libero_image / resize_image and
`verl/workers/rollout/rob_rollout.py` center_crop_image / crop_and_resize) turn the 256x256 agentview frame into
the policy's 224x224 input with TensorFlow:

1. `img[::-1, ::-1]`: the agentview camera is mounted upside down;
2. `tf.image.encode_jpeg(img)` at its defaults (quality 95, 4:2:0 chroma subsampling), then
   `tf.io.decode_image`, whose default DCT method is libjpeg's fast integer IDCT (JDCT_IFAST), with fancy
   (triangle) chroma upsampling: the same JPEG round trip the training data went through;
3. `tf.image.resize(224, method="lanczos3", antialias=True)`, then `tf.cast(tf.clip_by_value(tf.round(x), 0, 255),
   tf.uint8)` (round half to even);
4. center crop (`center_crop=True` in all of them): `tf.image.convert_image_dtype` to float32 (x * (1/255)),
   `tf.image.crop_and_resize` (bilinear) of the central box of area 0.9 (side sqrt(0.9) of the image's) back to
   the same size, `tf.clip_by_value(x, 0, 1)`, `tf.image.convert_image_dtype(x, tf.uint8, saturate=True)`, which
   is floor(x * 255.5).

Each step below re-implements the corresponding TensorFlow / libjpeg(-turbo) kernel in integer or float32 numpy
arithmetic (libjpeg's jccolor.c, jcsample.c, jfdctint.c, jcdctmgr.c, jidctfst.c, jddctmgr.c, jdsample.c,
jdcolor.c; TensorFlow's scale_and_translate_op.cc and crop_and_resize_op.cc). bench/check_libero_image_vs_tf.py
measures the agreement with TensorFlow on rendered LIBERO frames.
"""

from __future__ import annotations

import numpy as np

JPEG_QUALITY = 95  # tf.image.encode_jpeg's default
CROP_AREA = 0.9  # the center crop keeps 90% of the image area

# The example quantisation tables of the JPEG standard (ITU T.81 Annex K), natural (row-major) order.
LUMA_QUANT = np.array(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ]
).reshape(8, 8)
CHROMA_QUANT = np.full((8, 8), 99)
CHROMA_QUANT[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def model_image(agentview: np.ndarray, size: int = 224, center_crop: bool = True) -> np.ndarray:
    """Raw agentview frame (H, W, 3) uint8 -> the policy's (size, size, 3) uint8 image (steps 1-4 above)."""
    image = jpeg_round_trip(np.ascontiguousarray(agentview[::-1, ::-1]))
    image = resize_lanczos3(image, size)
    return crop_center(image) if center_crop else image


# ---------------------------------------------------------------------------------------------------------------
# JPEG round trip: libjpeg's encoder (RGB -> YCbCr, 2x2 chroma averaging, accurate integer forward DCT,
# quantisation) and decoder (fast integer inverse DCT, fancy upsampling, YCbCr -> RGB). Huffman coding is lossless
# and therefore skipped.
# ---------------------------------------------------------------------------------------------------------------


def quant_table(base: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """libjpeg's jpeg_set_quality: scale the standard table by the quality factor (jcparam.c)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


def _fix(x: float, bits: int) -> int:
    return int(x * (1 << bits) + 0.5)


def _rgb_to_ycbcr(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """jccolor.c: 16-bit fixed point; Cb/Cr offset by 128."""
    r, g, b = (rgb[..., c].astype(np.int64) for c in range(3))
    half, offset = 1 << 15, 128 << 16
    y = (_fix(0.299, 16) * r + _fix(0.587, 16) * g + _fix(0.114, 16) * b + half) >> 16
    cb = (-_fix(0.16874, 16) * r - _fix(0.33126, 16) * g + _fix(0.5, 16) * b + offset + half - 1) >> 16
    cr = (_fix(0.5, 16) * r - _fix(0.41869, 16) * g - _fix(0.08131, 16) * b + offset + half - 1) >> 16
    return y, cb, cr


def _downsample_2x2(plane: np.ndarray) -> np.ndarray:
    """jcsample.c h2v2_downsample: mean of each 2x2 block, rounding bias alternating 1, 2 along the row."""
    h, w = plane.shape
    total = plane.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3))
    bias = np.tile([1, 2], w // 4 + 1)[: w // 2]
    return (total + bias) >> 2


def _blocks(plane: np.ndarray) -> np.ndarray:
    h, w = plane.shape
    return plane.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)  # (rows, cols, 8, 8)


def _unblocks(blocks: np.ndarray) -> np.ndarray:
    rows, cols = blocks.shape[:2]
    return blocks.transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8)


def _fdct_islow_1d(d: list[np.ndarray], first_pass: bool) -> list[np.ndarray]:
    """One pass of jfdctint.c (libjpeg's default "accurate integer" forward DCT, 13-bit constants)."""
    const_bits, pass1_bits = 13, 2
    shift = const_bits - pass1_bits if first_pass else const_bits + pass1_bits

    def descale(x, n):
        return (x + (1 << (n - 1))) >> n

    c = {
        name: _fix(value, const_bits)
        for name, value in [
            ("0_298", 0.298631336),
            ("0_390", 0.390180644),
            ("0_541", 0.541196100),
            ("0_765", 0.765366865),
            ("0_899", 0.899976223),
            ("1_175", 1.175875602),
            ("1_501", 1.501321110),
            ("1_847", 1.847759065),
            ("1_961", 1.961570560),
            ("2_053", 2.053119869),
            ("2_562", 2.562915447),
            ("3_072", 3.072711026),
        ]
    }
    tmp0, tmp7 = d[0] + d[7], d[0] - d[7]
    tmp1, tmp6 = d[1] + d[6], d[1] - d[6]
    tmp2, tmp5 = d[2] + d[5], d[2] - d[5]
    tmp3, tmp4 = d[3] + d[4], d[3] - d[4]
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    out = [None] * 8
    if first_pass:
        out[0], out[4] = (tmp10 + tmp11) << pass1_bits, (tmp10 - tmp11) << pass1_bits
    else:
        out[0], out[4] = descale(tmp10 + tmp11, pass1_bits), descale(tmp10 - tmp11, pass1_bits)
    z1 = (tmp12 + tmp13) * c["0_541"]
    out[2] = descale(z1 + tmp13 * c["0_765"], shift)
    out[6] = descale(z1 - tmp12 * c["1_847"], shift)
    z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * c["1_175"]
    tmp4, tmp5, tmp6, tmp7 = tmp4 * c["0_298"], tmp5 * c["2_053"], tmp6 * c["3_072"], tmp7 * c["1_501"]
    z1, z2 = -z1 * c["0_899"], -z2 * c["2_562"]
    z3, z4 = -z3 * c["1_961"] + z5, -z4 * c["0_390"] + z5
    out[7] = descale(tmp4 + z1 + z3, shift)
    out[5] = descale(tmp5 + z2 + z4, shift)
    out[3] = descale(tmp6 + z2 + z3, shift)
    out[1] = descale(tmp7 + z1 + z4, shift)
    return out


def _idct_ifast_1d(d: list[np.ndarray]) -> list[np.ndarray]:
    """One pass of jidctfst.c (libjpeg's "fast integer" inverse DCT, AAN, 8-bit constants, truncating shifts)."""

    def multiply(x, const):
        return (x * const) >> 8

    tmp10, tmp11 = d[0] + d[4], d[0] - d[4]
    tmp13 = d[2] + d[6]
    tmp12 = multiply(d[2] - d[6], 362) - tmp13  # 362 = 1.414213562 * 256
    tmp0, tmp3, tmp1, tmp2 = tmp10 + tmp13, tmp10 - tmp13, tmp11 + tmp12, tmp11 - tmp12
    z13, z10, z11, z12 = d[5] + d[3], d[5] - d[3], d[1] + d[7], d[1] - d[7]
    tmp7 = z11 + z13
    tmp11 = multiply(z11 - z13, 362)
    z5 = multiply(z10 + z12, 473)  # 1.847759065
    tmp10 = multiply(z12, 277) - z5  # 1.082392200
    tmp12 = multiply(z10, -669) + z5  # 2.613125930
    tmp6 = tmp12 - tmp7
    tmp5 = tmp11 - tmp6
    tmp4 = tmp10 + tmp5
    return [tmp0 + tmp7, tmp1 + tmp6, tmp2 + tmp5, tmp3 - tmp4, tmp3 + tmp4, tmp2 - tmp5, tmp1 - tmp6, tmp0 - tmp7]


def _aan_scales() -> np.ndarray:
    """jddctmgr.c's aanscales: 2^14 * s(u) * s(v), s(0) = 1, s(k) = sqrt(2) cos(k pi / 16)."""
    s = np.array([1.0] + [np.sqrt(2) * np.cos(k * np.pi / 16) for k in range(1, 8)])
    return np.floor(16384 * np.outer(s, s) + 0.5).astype(np.int64)


def _code_plane(plane: np.ndarray, quant: np.ndarray) -> np.ndarray:
    """Samples (H, W) in 0..255 -> quantise -> dequantise -> samples, through libjpeg's integer transforms."""
    blocks = _blocks(plane - 128)  # (rows, cols, 8, 8), level-shifted
    rows = _fdct_islow_1d([blocks[..., :, k] for k in range(8)], first_pass=True)  # over each row
    coef = np.stack(_fdct_islow_1d([np.stack(rows, -1)[..., k, :] for k in range(8)], first_pass=False), -2)
    divisor = quant * 8  # the forward DCT output is scaled up by 8 (jcdctmgr.c)
    coef = np.sign(coef) * ((np.abs(coef) + divisor // 2) // divisor)  # round half away from zero
    dequant = coef * ((quant * _aan_scales() + (1 << 11)) >> 12)  # IFAST multiplier table (jddctmgr.c)
    cols = np.stack(_idct_ifast_1d([dequant[..., k, :] for k in range(8)]), -2)  # over each column
    out = np.stack(_idct_ifast_1d([cols[..., :, k] for k in range(8)]), -1) >> 5  # PASS1_BITS + 3
    return _unblocks(np.clip(out + 128, 0, 255))


def _upsample_2x2_fancy(plane: np.ndarray) -> np.ndarray:
    """jdsample.c h2v2_fancy_upsample: triangle filter, 3/4 nearer + 1/4 farther sample in each direction."""
    padded = np.pad(plane, 1, mode="edge")
    near = 3 * plane
    vertical = np.stack([near + padded[:-2, 1:-1], near + padded[2:, 1:-1]], 1).reshape(-1, plane.shape[1])
    vpad = np.pad(vertical, ((0, 0), (1, 1)), mode="edge")
    left = (3 * vertical + vpad[:, :-2] + 8) >> 4
    right = (3 * vertical + vpad[:, 2:] + 7) >> 4
    return np.stack([left, right], -1).reshape(vertical.shape[0], -1)


def _ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """jdcolor.c: per-value tables, 16-bit fixed point."""
    half = 1 << 15
    cb, cr = cb - 128, cr - 128
    r = y + ((_fix(1.402, 16) * cr + half) >> 16)
    g = y + ((-_fix(0.34414, 16) * cb + half - _fix(0.71414, 16) * cr) >> 16)
    b = y + ((_fix(1.772, 16) * cb + half) >> 16)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """tf.io.decode_image(tf.image.encode_jpeg(image)): (H, W, 3) uint8, H and W multiples of 16."""
    h, w, _ = image.shape
    if h % 16 or w % 16:
        raise ValueError(f"jpeg_round_trip needs a height and width that are multiples of 16, got {h}x{w}")
    y, cb, cr = _rgb_to_ycbcr(image)
    luma, chroma = quant_table(LUMA_QUANT, quality), quant_table(CHROMA_QUANT, quality)
    y = _code_plane(y, luma)
    cb = _upsample_2x2_fancy(_code_plane(_downsample_2x2(cb), chroma))
    cr = _upsample_2x2_fancy(_code_plane(_downsample_2x2(cr), chroma))
    return _ycbcr_to_rgb(y, cb, cr)


# ---------------------------------------------------------------------------------------------------------------
# Resize and crop: TensorFlow's float32 CPU kernels.
# ---------------------------------------------------------------------------------------------------------------


def lanczos3_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TF scale_and_translate_op.cc ComputeSpans for lanczos3 with antialias (no translation).

    Returns span starts (out_size,) and normalised weights (out_size, span) in float32; output pixel x reads input
    pixels starts[x] + i with weight weights[x, i] (zero past the image edge)."""
    f32 = np.float32
    radius = f32(3.0)
    inv_scale = f32(1.0 / f32(f32(out_size) / f32(in_size)))
    kernel_scale = max(inv_scale, f32(1.0))  # antialias: widen the kernel when downsampling
    span = min(2 * int(np.ceil(radius * kernel_scale)) + 1, in_size)
    sample = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale
    starts = np.clip(np.ceil(sample - radius * kernel_scale - f32(0.5)), 0, in_size - 1).astype(np.int64)
    ends = np.clip(np.floor(sample + radius * kernel_scale - f32(0.5)), 0, in_size - 1).astype(np.int64) + 1
    source = starts[:, None] + np.arange(span)
    x = np.abs((source.astype(f32) + f32(0.5) - sample[:, None]) * (f32(1.0) / kernel_scale))
    pi = f32(np.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = radius * np.sin(pi * x) * np.sin(pi * x / radius) / (pi * pi * x * x)
    kernel = np.where(x <= f32(1e-3), f32(1.0), np.where(x > radius, f32(0.0), kernel)).astype(f32)
    kernel[source >= ends[:, None]] = 0.0
    total = np.zeros(out_size, f32)
    for i in range(span):  # the kernel's summation order
        total += kernel[:, i]
    return starts, (kernel * (f32(1.0) / total)[:, None]).astype(f32)


def _resample_axis(image: np.ndarray, starts: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(image, axis, 0)
    padded = np.concatenate([moved, np.zeros((weights.shape[1],) + moved.shape[1:], np.float32)])
    shape = (-1,) + (1,) * (moved.ndim - 1)
    out = np.zeros((len(starts),) + moved.shape[1:], np.float32)
    for i in range(weights.shape[1]):  # zero weights past the edge read the zero padding
        out += weights[:, i].reshape(shape) * padded[starts + i]
    return np.moveaxis(out, 0, axis)


def resize_lanczos3(image: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resize(image, (size, size), "lanczos3", antialias=True), rounded half to even -> uint8.

    Rows are filtered first (along the width), then columns, as TF's GatherSpans does."""
    h, w, _ = image.shape
    out = image.astype(np.float32)
    out = _resample_axis(out, *lanczos3_weights(w, size), axis=1)
    out = _resample_axis(out, *lanczos3_weights(h, size), axis=0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def center_crop_box(crop_area: float = CROP_AREA) -> tuple[np.float32, np.float32]:
    """Normalised (start, end) of the central crop of area `crop_area`, the same on both axes, in float32."""
    side = np.clip(np.sqrt(np.float32(crop_area)), 0, 1).astype(np.float32)
    start = (np.float32(1) - side) / np.float32(2)
    return start, start + side


def crop_center(image: np.ndarray, crop_area: float = CROP_AREA) -> np.ndarray:
    """The center crop of area `crop_area` bilinearly resized back to the image's size (tf.image.crop_and_resize
    on x / 255 in float32), converted back to uint8 as tf.image.convert_image_dtype does: floor(x * 255.5)."""
    f32 = np.float32
    h, w, _ = image.shape
    pixels = image.astype(f32) * f32(1.0 / 255.0)
    start, end = center_crop_box(crop_area)

    def sample_points(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = (end - start) * f32(size - 1) / f32(size - 1)
        pos = start * f32(size - 1) + np.arange(size, dtype=f32) * scale
        low = np.floor(pos).astype(np.int64)
        return low, np.ceil(pos).astype(np.int64), (pos - low.astype(f32)).astype(f32)

    top, bottom, y_lerp = sample_points(h)
    left, right, x_lerp = sample_points(w)
    x_lerp = x_lerp[None, :, None]
    upper = pixels[top][:, left] + (pixels[top][:, right] - pixels[top][:, left]) * x_lerp
    lower = pixels[bottom][:, left] + (pixels[bottom][:, right] - pixels[bottom][:, left]) * x_lerp
    crop = np.clip(upper + (lower - upper) * y_lerp[:, None, None], 0, 1)
    return np.minimum(np.floor(crop * f32(255.5)), 255).astype(np.uint8)
