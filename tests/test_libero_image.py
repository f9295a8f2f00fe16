"""The LIBERO model image (common/envs/libero_image.py) on hand-worked examples; no simulator.

Agreement with TensorFlow itself is measured by bench/check_libero_image_vs_tf.py (it needs TensorFlow)."""

import io

import numpy as np
from PIL import Image

from common.envs.libero_image import (
    CHROMA_QUANT,
    LUMA_QUANT,
    center_crop_box,
    crop_center,
    jpeg_round_trip,
    lanczos3_weights,
    model_image,
    quant_table,
    resize_lanczos3,
)


def test_quality_95_tables():
    # libjpeg's scaling at quality 95: (base * 10 + 50) // 100, at least 1
    np.testing.assert_array_equal(quant_table(LUMA_QUANT)[0], [2, 1, 1, 2, 2, 4, 5, 6])
    np.testing.assert_array_equal(quant_table(CHROMA_QUANT)[0], [2, 2, 2, 5, 10, 10, 10, 10])


def test_jpeg_round_trip():
    grey = np.full((16, 32, 3), 128, dtype=np.uint8)  # Y = Cb = Cr = 128: every coefficient but DC is 0
    np.testing.assert_array_equal(jpeg_round_trip(grey), grey)
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)))
    out = jpeg_round_trip(smooth)
    assert out.dtype == np.uint8 and out.shape == smooth.shape
    np.testing.assert_array_equal(out, jpeg_round_trip(smooth))  # deterministic
    # The same JPEG as Pillow's (same libjpeg encoder), decoded with the fast instead of the accurate IDCT
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, "JPEG", quality=95)
    pillow = np.asarray(Image.open(buffer)).astype(int)
    assert np.abs(out - pillow).mean() < 3 and np.abs(out - smooth.astype(int)).mean() < 4


def test_lanczos3_weights():
    starts, weights = lanczos3_weights(256, 224)
    assert weights.shape == (224, 9)  # kernel radius 3 widened by 256/224: 2 * ceil(3.43) + 1 taps
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    assert starts[0] == 0 and starts[-1] + 9 > 255  # the edge spans are cut at the image border
    # Same size: the Lanczos kernel is 1 at 0 and 0 at the other integers, so the image is unchanged
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_lanczos3(image, 16), image)
    np.testing.assert_array_equal(resize_lanczos3(np.full((32, 32, 3), 77, np.uint8), 28), 77)


def test_crop_box_and_bilinear_by_hand():
    start, end = center_crop_box(0.9)
    np.testing.assert_allclose([start, end], [(1 - 0.9**0.5) / 2, (1 + 0.9**0.5) / 2], rtol=1e-6)
    # A 5-pixel ramp 0, 51, .., 204: the crop samples x = 4 * 0.02566 + k * 0.94868 = 0.103, 1.051, 2.0, 2.949,
    # 3.897, i.e. 51 x / 255 in [0, 1], and converts back with floor(v * 255.5): 5, 53, 102, 150, 199.
    ramp = np.tile((51 * np.arange(5)).astype(np.uint8)[None, :, None], (5, 1, 3))
    np.testing.assert_array_equal(crop_center(ramp)[2, :, 0], [5, 53, 102, 150, 199])
    np.testing.assert_array_equal(crop_center(ramp)[:, 2, 0], 102)  # constant along the columns


def test_model_image_stages():
    raw = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    uncropped = resize_lanczos3(jpeg_round_trip(np.ascontiguousarray(raw[::-1, ::-1])), 32)
    np.testing.assert_array_equal(model_image(raw, 32, center_crop=False), uncropped)
    np.testing.assert_array_equal(model_image(raw, 32), crop_center(uncropped))
