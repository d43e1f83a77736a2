"""resize_with_pad: openpi's client geometry (PIL bilinear, keep aspect, centred zero pad) and label masks in step."""

import numpy as np
import pytest
from PIL import Image

from openpi.shared import image_tools


def _rng_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_pad_geometry_hand_computed():
    # 256x200 into 224x224: ratio = 256/224, width 200/ratio = 175, pad (224-175)//2 = 24.
    assert image_tools.pad_geometry(256, 200, 224, 224) == image_tools.PadGeometry(224, 175, 0, 24)
    # 100x200 into 224x224: ratio = 200/224, height 100/ratio = 112, pad (224-112)/2 = 56.
    assert image_tools.pad_geometry(100, 200, 224, 224) == image_tools.PadGeometry(112, 224, 56, 0)
    assert image_tools.pad_geometry(256, 256, 224, 224) == image_tools.PadGeometry(224, 224, 0, 0)


def test_bilinear_matches_pil_resize_and_zero_pads():
    img = _rng_image(100, 200)
    out = image_tools.resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    expected_block = np.asarray(Image.fromarray(img).resize((224, 112), resample=Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[56:168], expected_block)
    assert not out[:56].any() and not out[168:].any()


def test_square_downscale_is_plain_pil_bilinear():
    img = _rng_image(256, 256, seed=1)
    out = image_tools.resize_with_pad(img, 224, 224)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR)))


def test_same_size_is_returned_unchanged_and_batches_keep_leading_dims():
    img = _rng_image(224, 224)
    assert image_tools.resize_with_pad(img, 224, 224) is img
    batch = np.stack([[_rng_image(64, 48, s) for s in range(3)] for _ in range(2)])  # (2, 3, 64, 48, 3)
    out = image_tools.resize_with_pad(batch, 32, 32)
    assert out.shape == (2, 3, 32, 32, 3)
    np.testing.assert_array_equal(out[1, 2], image_tools.resize_with_pad(batch[1, 2], 32, 32))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.int16])
def test_nearest_keeps_labels_and_dtype(dtype):
    rng = np.random.default_rng(3)
    labels = rng.integers(-1 if dtype != np.uint8 else 0, 40, (256, 200)).astype(dtype)
    out = image_tools.resize_with_pad_nearest(labels, 224, 224)
    assert out.dtype == labels.dtype and out.shape == (224, 224)
    assert set(np.unique(out[:, 24:199]).tolist()) <= set(np.unique(labels).tolist())
    assert not out[:, :24].any() and not out[:, 199:].any()  # padding columns are label 0


def test_mask_and_image_share_geometry():
    """A planted bright rectangle and its label land on the same output pixels (non-square source: padding)."""
    img = np.zeros((180, 240, 3), np.uint8)
    labels = np.zeros((180, 240), np.int32)
    img[40:100, 60:150] = 255
    labels[40:100, 60:150] = 7
    out_img = image_tools.resize_with_pad(img, 224, 224)
    out_lab = image_tools.resize_with_pad_nearest(labels, 224, 224)
    inside = out_lab == 7
    assert inside.sum() > 1000
    assert out_img[inside].min() >= 120  # every labelled pixel is (mostly) bright
    # Pixels well away from the label (dilated by 2 px) are dark.
    grown = np.zeros_like(inside)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            grown |= np.roll(np.roll(inside, dy, 0), dx, 1)
    assert out_img[~grown].max() == 0
    # A 1-pixel shifted mask would not satisfy this: the check is sensitive.
    assert out_img[np.roll(inside, 3, 1)].min() < 120


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="uint8"):
        image_tools.resize_with_pad(np.zeros((8, 8, 3), np.float32), 4, 4)
    with pytest.raises(ValueError, match="integer"):
        image_tools.resize_with_pad(np.zeros((8, 8, 1), np.float32), 4, 4, method="nearest")
    with pytest.raises(ValueError, match="shape"):
        image_tools.resize_with_pad(np.zeros((8, 8), np.uint8), 4, 4)
    with pytest.raises(ValueError, match="method"):
        image_tools.resize_with_pad(np.zeros((8, 8, 3), np.uint8), 4, 4, method="cubic")
    with pytest.raises(ValueError, match="int32"):
        image_tools.resize_with_pad_nearest(np.full((8, 8), 2**40, np.int64), 4, 4)
