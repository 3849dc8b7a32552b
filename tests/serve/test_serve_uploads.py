"""serve/uploads.py: decoding what the browser sends and checking a results file, against
hand-made files whose contents are known."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from gradindex.serve.limits import Limits
from gradindex.serve.uploads import UploadError, decode_images, parse_results


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_a_png_decodes_to_its_own_pixels():
    pixels = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    out = decode_images(_png(pixels, "L"), "digit.png", 1, Limits())
    assert out.shape == (1, 1, 5, 7) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], pixels)
    rgb = np.stack([pixels, 255 - pixels, pixels // 2], -1)
    out = decode_images(_png(rgb, "RGB"), "c.png", 3, Limits())
    np.testing.assert_array_equal(out[0], rgb.transpose(2, 0, 1))


def test_a_npy_of_images_keeps_its_values_and_one_image_gains_a_batch_axis():
    many = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(decode_images(_npy(many), "q.npy", 1, Limits()), many)
    one = many[0]  # [C, H, W]
    np.testing.assert_array_equal(decode_images(_npy(one), "q.npy", 1, Limits()), one[None])


@pytest.mark.parametrize(
    "data, limits, message",
    [
        (b"", Limits(), "no file was uploaded"),
        (b"GIF89a....", Limits(), "q: not a PNG, JPEG or .npy file"),
        (_npy(np.zeros((5, 1, 4, 4), np.float32)), Limits(max_images=4), "5 images; at most 4"),
        (_npy(np.full((1, 1, 4, 4), np.nan, np.float32)), Limits(), "NaN or infinite"),
        (_npy(np.zeros((1, 1, 8, 8), np.float32)), Limits(max_pixels=63), "8x8 are too large"),
        (_png(np.zeros((8, 9), np.uint8), "L"), Limits(max_pixels=71), "q"),
        (b"\x89PNG\r\n\x1a\nbroken", Limits(), "q: not a readable image"),
    ],
)
def test_bad_uploads_are_one_line_upload_errors(data, limits, message):
    with pytest.raises(UploadError, match=message) as err:
        decode_images(data, "q", 1, limits)
    assert "\n" not in str(err.value)


def _line(**rec) -> str:
    return json.dumps(rec)


def test_results_are_grouped_by_query_with_ranks_and_missing_rows_dropped():
    ids = np.array([10, 11, 12, 13])
    text = "\n".join(
        [
            _line(query="a.png", method="tracin", rows=[2, 0], ids=[12, 10], scores=[3.0, 1.5]),
            _line(query="a.png", method="retrac", rows=[1, -1], ids=[11, None], scores=[0.5, 0]),
            _line(method="tracin", rows=[3], ids=["13"], scores=[2]),  # no query: its line
        ]
    )
    got = parse_results(text, "r.jsonl", ids, Limits())
    assert got == [
        {
            "query": "a.png",
            "methods": {
                "tracin": [(1, 2, 12, 3.0), (2, 0, 10, 1.5)],
                "retrac": [(1, 1, 11, 0.5)],
            },
        },
        {"query": "3", "methods": {"tracin": [(1, 3, "13", 2.0)]}},
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("  \n", "r: empty"),
        ("{not json", "r line 1: not JSON"),
        (_line(method="tracin", rows=[0]), "r line 1: needs the keys method, rows, ids, scores"),
        (_line(method="tracin", rows=[0], ids=[], scores=[1]), "lists of one length"),
        (_line(method=3, rows=[0], ids=[10], scores=[1]), "method must be a name"),
        (_line(method="tracin", rows=[4], ids=[14], scores=[1]), "outside this index's 0..3"),
        (_line(method="tracin", rows=[1], ids=[99], scores=[1]), "ids differ from this index"),
    ],
)
def test_a_results_file_of_another_index_or_a_broken_one_is_refused(text, message):
    with pytest.raises(UploadError, match=message):
        parse_results(text, "r", np.array([10, 11, 12, 13]), Limits())


def test_a_results_file_over_the_record_limit_is_refused():
    text = "\n".join(_line(method="tracin", rows=[0], ids=[10], scores=[1]) for _ in range(3))
    with pytest.raises(UploadError, match="3 records; at most 2"):
        parse_results(text, "r", np.array([10]), Limits(max_results=2))
