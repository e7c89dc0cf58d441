"""Decoding and normalisation of single images (the ingest worker's pure function)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bad_inputs import cases, exif_rotated_jpeg, palette_with_transparency, sixteen_bit_png
from coarse2fine.preprocess.images import RejectedImage, normalise_image, split_of

RES = 16


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize("name", sorted(cases()))
def test_each_bad_input_is_converted_or_rejected_with_reason(name):
    data, expected_error = cases()[name]
    if expected_error is None:
        norm = normalise_image(data, RES, min_size=8)
        img = decoded(norm.png)
        assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
    else:
        with pytest.raises(RejectedImage) as e:
            normalise_image(data, RES, min_size=8)
        assert e.value.error == expected_error
        assert e.value.detail


def test_sixteen_bit_is_scaled_not_clipped():
    img = decoded(normalise_image(sixteen_bit_png(), 40, 8).png)
    # a full-range ramp: darkest near 0, brightest near 255, mid-grey in between (clipping
    # to 8 bits would make nearly everything 255)
    assert img.min() < 10 and img.max() > 245
    assert 100 < img.mean() < 155


def test_palette_transparency_composited_on_white():
    img = decoded(normalise_image(palette_with_transparency(), 40, 8).png)
    assert (img[:, :15] == [0, 0, 255]).all()  # opaque blue half
    assert (img[:, 25:] == [255, 255, 255]).all()  # transparent half -> white


def test_exif_orientation_applied():
    norm = normalise_image(exif_rotated_jpeg(), 16, 8)
    assert (norm.width, norm.height) == (32, 48)  # 48x32 rotated by 90 degrees


def test_resize_and_centre_crop_keep_content_centred():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 20:60] = 255  # a white square in the middle of a wide image
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    img = decoded(normalise_image(buf.getvalue(), 20, 8).png)
    assert img.shape == (20, 20, 3) and img.min() > 200  # the crop is the centre square


def test_key_is_content_hash_and_split_is_deterministic():
    data, _ = cases()["grey.png"]
    a, b = normalise_image(data, RES, 8), normalise_image(data, RES, 8)
    assert a.key == b.key and len(a.key) == 64
    assert split_of(a.key, 0.5) == split_of(a.key, 0.5)
    keys = [f"{i:08x}" + "0" * 56 for i in range(0, 2**32 - 1, 2**24)]
    share = np.mean([split_of(k, 0.25) == "validation" for k in keys])
    assert 0.2 < share < 0.3
