"""Query and training inputs: each input's own value range, resizing (warned, recorded, equal to
torch's interpolation), image files in the model's channels (LA, 16-bit), one-line errors for
object arrays, mixed-size folders and bad --config files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gradindex as gi
from gradindex.inputs import files, query_images, ranges
from gradindex.inputs import pixels as pixel_rules
from tests.conftest import error_line, run, scheduler, tiny_unet

SPEC = gi.BuildSpec(proj_dim=32, timesteps=2, batch_size=4)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """7 uint8 images [7, 1, 8, 8] spanning 0..255."""
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, size=(7, 1, 8, 8), dtype=np.uint8)
    arr[0, 0, 0, :2] = (0, 255)
    return arr


@pytest.fixture(scope="module")
def uint8_index(tmp_path_factory, pixels):
    """An index built from uint8 images (the range a PNG folder has), in a folder on disk."""
    from diffusers import DDPMPipeline

    root = tmp_path_factory.mktemp("u8")
    DDPMPipeline(unet=tiny_unet(5), scheduler=scheduler()).save_pretrained(root / "ckpt")
    out = root / "idx"
    gi.build_index(checkpoints=[root / "ckpt"], data=pixels, out=out, spec=SPEC, progress=False)
    return gi.AttributionIndex.open(out)


# -- item 1: the value range belongs to each input ------------------------------------------------


def test_float_queries_in_0_1_and_minus1_1_embed_as_the_uint8_images(uint8_index, pixels):
    """A diffusers pipeline's output (float in [0, 1]) of the same pixels must give the uint8
    query's vectors and neighbours, not be read on the index's 0..255 scale."""
    want = uint8_index.embed(pixels)
    np.testing.assert_allclose(want["tracin"], uint8_index.vectors("tracin"), rtol=1e-5, atol=1e-6)
    for as_float in (pixels / np.float32(255), pixels / np.float32(127.5) - 1):
        got = uint8_index.embed(as_float.astype(np.float32))
        for m in ("tracin", "retrac"):
            np.testing.assert_allclose(got[m], want[m], rtol=1e-4, atol=1e-6)
        res = uint8_index.query(as_float, k=3, method="retrac")
        ref = uint8_index.query(pixels, k=3, method="retrac")
        np.testing.assert_array_equal(res.rows, ref.rows)


def test_explicit_and_recorded_ranges_still_work(tmp_path, pixels):
    """A range given at build (floats 0..1000) serves queries on that scale; a range given at
    query time overrides; floats wider than [-1, 1] outside the index's range are refused."""
    pair = (tiny_unet(5), scheduler())
    on_1000 = (pixels * np.float32(1000 / 255)).astype(np.float32)
    spec = SPEC.replace(data_range=(0.0, 1000.0))
    idx = gi.build_index(
        checkpoints=[pair], data=on_1000, out=tmp_path / "i", spec=spec, progress=False
    )
    stored = idx.vectors("retrac")
    np.testing.assert_allclose(idx.embed(on_1000)["retrac"], stored, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(idx.embed(pixels)["retrac"], stored, rtol=1e-4, atol=1e-6)
    on_10 = pixels * np.float32(10 / 255)
    np.testing.assert_allclose(
        idx.embed(on_10, data_range=(0, 10))["retrac"], stored, rtol=1e-4, atol=1e-6
    )
    with pytest.raises(gi.DataError, match="data-range LOW HIGH"):
        idx.embed(pixels * np.float32(4000 / 255))


@pytest.mark.parametrize(
    "lo,hi,want",
    [(0.0, 1.0, (0.0, 1.0)), (-0.004, 1.003, (0.0, 1.0)), (-1.0, 0.3, (-1.0, 1.0))],
)
def test_range_from_values_tolerates_resampling_overshoot(lo, hi, want):
    """[0, 1] images slightly overshot by resampling are still [0, 1], not [-1, 1]."""
    arr = np.linspace(lo, hi, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    assert ranges.resolve_data_range(arr) == want


@pytest.mark.parametrize("lo,hi", [(-0.3, 1.2), (0.5, 2.0), (0.0, 300.0)])
def test_ambiguous_ranges_are_refused_with_how_to_give_one(uint8_index, lo, hi):
    arr = np.linspace(lo, hi, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    with pytest.raises(gi.DataError, match=r"data_range=\(low, high\)"):
        uint8_index.prepare(arr)


def test_cli_float_query_on_a_uint8_index(tmp_path, uint8_index, pixels):
    path = tmp_path / "q.npy"
    np.save(path, pixels / np.float32(255))
    res = run("query", uint8_index.path, path, "-k", "2", "--method", "tracin", "--json")
    assert res.exit_code == 0, res.output
    got = [json.loads(ln)["rows"] for ln in res.output.splitlines() if ln.startswith("{")]
    np.testing.assert_array_equal(got, uint8_index.query(pixels, k=2, method="tracin").rows)
    np.save(path, pixels * np.float32(2))  # 0..510: fits no range the index knows
    assert "--data-range" in error_line(run("query", uint8_index.path, path))
    res = run("query", uint8_index.path, path, "--data-range", "0", "510", "--json")
    assert res.exit_code == 0, res.output


# -- item 3: resizing is warned, recorded, and equals torch's interpolation ---------------------


def _mapped(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32)) / 255 * 2 - 1


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resize_warns_and_equals_torch_interpolate(pixels, mode):
    big = np.random.default_rng(1).integers(0, 256, (3, 1, 11, 13), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"resized from 11x13 to the model's 8x8"):
        x = pixel_rules.to_model_input(big, channels=1, size=8, data_range=(0, 255), resize=mode)
    kw = {"mode": "nearest"} if mode == "nearest" else {"mode": mode, "antialias": True}
    want = F.interpolate(_mapped(big), size=(8, 8), **kw)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own size: no warning
        pixel_rules.to_model_input(pixels, channels=1, size=8, data_range=(0, 255), resize=mode)


def test_resize_error_mode_refuses_with_both_sizes():
    big = np.zeros((2, 1, 11, 13), dtype=np.uint8)
    with pytest.raises(gi.DataError, match=r"images are 11x13 but the model takes 8x8"):
        pixel_rules.to_model_input(big, channels=1, size=8, data_range=(0, 255), resize="error")


def test_query_records_that_it_resized(uint8_index, pixels):
    big = np.random.default_rng(2).integers(0, 256, (2, 1, 12, 12), dtype=np.uint8)
    with pytest.warns(UserWarning, match="resized from 12x12"):
        res = uint8_index.query(big, k=3, method="tracin")
    assert res.resized == (12, 12)
    small = F.interpolate(_mapped(big), size=(8, 8), mode="bilinear", antialias=True).numpy()
    ref = uint8_index.query(small, k=3, method="tracin", data_range=(-1, 1))
    assert ref.resized is None
    np.testing.assert_array_equal(res.rows, ref.rows)
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-4)


def test_cli_query_json_says_resized(tmp_path, uint8_index):
    path = tmp_path / "big.npy"
    np.save(path, np.random.default_rng(2).integers(0, 256, (2, 1, 12, 12), dtype=np.uint8))
    res = run("query", uint8_index.path, path, "-k", "2", "--json")
    assert res.exit_code == 0, res.output
    assert "Warning: images resized from 12x12" in res.output
    records = [json.loads(ln) for ln in res.output.splitlines() if ln.startswith("{")]
    assert len(records) == 4 and all(r["resized"] == [12, 12] for r in records)
    np.save(path, np.zeros((2, 1, 8, 8), np.uint8))
    res = run("query", uint8_index.path, path, "-k", "2", "--json")
    assert all(json.loads(ln)["resized"] is None for ln in res.output.splitlines())


# -- item 8: object arrays and broken array files are one line ----------------------------------


def _object_array() -> np.ndarray:
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = np.zeros((8, 8)), np.ones((8, 8))
    return arr


def test_object_and_broken_npy_files_are_one_line(tmp_path, uint8_index, saved_checkpoints):
    obj = tmp_path / "obj.npy"
    np.save(obj, _object_array(), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", tracin=_object_array(), retrac=_object_array())
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    for name in ("obj.npy", "obj.npz"):
        line = error_line(run("query", uint8_index.path, tmp_path / name, "--vectors"))
        assert name in line and "Python objects" in line
    assert "Python objects" in error_line(run("query", uint8_index.path, obj))
    out = tmp_path / "out"
    line = error_line(run("build", "-c", saved_checkpoints[0], "--data", obj, "--out", out))
    assert "obj.npy" in line and "Python objects" in line
    with pytest.raises(gi.DataError, match="junk.npy: "):
        files.read_array(tmp_path / "junk.npy")
    with pytest.raises(gi.DataError, match="Python objects"):
        query_images.load_images(obj)


def test_a_file_that_is_no_npy_is_not_called_pickled(tmp_path, saved_checkpoints):
    """Session 14 probe: training data named .npy that is no numpy file at all (text, junk)
    was refused as 'holds Python objects (an object-dtype or pickled array)'."""
    from gradindex.inputs.training_data import open_source

    for name, data in (("text.npy", b"hello\n"), ("junk.npy", bytes(range(7, 200)))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(gi.DataError, match=f"{name}: not a numpy array file") as err:
            open_source(tmp_path / name, 1)
        assert "Python objects" not in str(err.value)
        args = ("build", "-c", saved_checkpoints[0], "--data", tmp_path / name)
        line = error_line(run(*args, "--out", tmp_path / "out"))
        assert line.startswith(f"Error: {tmp_path / name}: not a numpy array file"), line


def test_an_empty_query_array_is_not_called_a_dataset_to_index(tmp_path, uint8_index):
    """Session 14 probe: 'gradindex query IDX empty.npy' said 'the dataset is empty: no images
    to index' of the query images."""
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.uint8))
    line = error_line(run("query", uint8_index.path, tmp_path / "empty.npy"))
    assert line == "Error: images have shape (0, 1, 8, 8): empty, no images at all"


def test_object_captions_in_npz_are_one_line(tmp_path):
    from gradindex.inputs.training_data import open_source

    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 1, 8, 8), np.uint8), captions=_object_array())
    with pytest.raises(gi.DataError, match="Python objects"):
        query_images.read_inputs(path, 1, "text")  # query images
    with pytest.raises(gi.DataError, match="Python objects"):
        open_source(path, 1, carried=("captions",))  # training data, read with its captions


# -- item 9: image files in the model's channels, mixed sizes, --config --------------------------


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def test_la_and_16bit_pngs_load_in_the_models_channels(tmp_path):
    rng = np.random.default_rng(4)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    wide = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    alpha = np.full((8, 8), 77, np.uint8)
    _png(tmp_path / "la" / "a.png", np.stack([gray, alpha], -1), "LA")
    arr, _ = query_images.load_images(tmp_path / "la", channels=1)
    assert arr.shape == (1, 1, 8, 8) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[0, 0], gray)
    _png(tmp_path / "w" / "a.png", wide)
    assert Image.open(tmp_path / "w" / "a.png").mode == "I;16"
    arr, _ = query_images.load_images(tmp_path / "w", channels=1)
    np.testing.assert_array_equal(arr[0, 0], wide.astype(np.float32) / 65535)
    arr, _ = query_images.load_images(
        tmp_path / "w", channels=3
    )  # a grayscale file on an RGB model
    assert arr.shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(arr[0, 2], wide.astype(np.float32) / 65535)
    _png(tmp_path / "w" / "b.png", gray)  # 8- and 16-bit together: both as [0, 1] floats
    arr, ids = query_images.load_images(tmp_path / "w")
    assert list(ids) == ["a.png", "b.png"] and arr.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(arr[1, 0], gray.astype(np.float32) / 255)


def test_cli_query_of_la_pngs_on_a_one_channel_model(tmp_path, uint8_index, pixels):
    for i in range(3):
        _png(tmp_path / "q" / f"{i}.png", np.stack([pixels[i, 0], pixels[i, 0]], -1), "LA")
    res = run("query", uint8_index.path, tmp_path / "q", "-k", "1", "--method", "retrac", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(ln)["rows"][0] for ln in res.output.splitlines() if ln.startswith("{")]
    np.testing.assert_array_equal(rows, uint8_index.query(pixels[:3], k=1).rows[:, 0])


def test_mixed_size_folder_names_the_odd_file(tmp_path):
    for name in ("a.png", "b.png", "d.png"):
        _png(tmp_path / "f" / name, np.zeros((8, 8), np.uint8))
    _png(tmp_path / "f" / "c.png", np.zeros((10, 6), np.uint8))
    with pytest.raises(gi.DataError, match=r"3 are 8x8 \(HxW\) but c\.png is 10x6"):
        query_images.load_images(tmp_path / "f")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("{not json", "not valid JSON"),
        ('{"proj_dims": 3}', "unknown BuildSpec field"),
        ('{"data_range": 5}', "data_range"),
        ("[1, 2]", "object"),
    ],
)
def test_config_errors_name_the_file(tmp_path, saved_checkpoints, text, needle):
    cfg = tmp_path / "my_spec.json"
    cfg.write_text(text)
    res = run(
        "build",
        "-c",
        saved_checkpoints[0],
        "--data",
        "x.npy",
        "--out",
        tmp_path / "o",
        "--config",
        cfg,
    )
    line = error_line(res)
    assert str(cfg) in line and needle in line


def test_one_hwc_image_without_a_batch_axis_is_refused():
    """[H, W, C] could be one image or H images C pixels wide: refused, never guessed."""
    one = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(gi.DataError, match=r"shape \(8, 8, 3\).*x\[None\]"):
        pixel_rules.to_nchw(one)
    assert pixel_rules.to_nchw(one[None]).shape == (1, 3, 8, 8)
    assert pixel_rules.to_nchw(np.zeros((5, 8, 8), dtype=np.uint8)).shape == (5, 1, 8, 8)


def test_query_vectors_that_are_not_a_real_matrix_are_one_line(tmp_path, uint8_index):
    dim = uint8_index.dim
    for name, arr in (
        ("flat", np.zeros(dim, dtype=np.float32)),
        ("complex", np.zeros((2, dim), dtype=np.complex64)),
    ):
        np.save(tmp_path / f"{name}.npy", arr)
        res = run("query", uint8_index.path, tmp_path / f"{name}.npy", "--vectors")
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert error_line(res).startswith(f"Error: {tmp_path / name}.npy: query vectors")


@pytest.mark.parametrize(
    "mode,bits",
    [("1", 1), ("L", 8), ("L", 4), ("LA", 8), ("P", 8), ("RGB", 8), ("RGBA", 8), ("I;16", 16),
     ("RGB", 16), ("LA", 16)],
)  # fmt: skip
def test_a_png_header_reads_as_pil_opens_it(tmp_path, monkeypatch, mode, bits):
    """image_header's 33-byte IHDR path gives the mode and size PIL's Image.open gives, for
    every PNG colour type and the bit depths PIL writes (and ones it only reads, written by
    hand: 4-bit gray, 16-bit RGB and gray + alpha)."""
    import struct
    import zlib

    from gradindex.inputs.files import image_header

    path = tmp_path / "a.png"
    if bits in (8, 1) or mode == "I;16":
        size = (7, 5)
        Image.new(mode, size).save(path)
    else:  # a valid header and one row of pixels in a depth PIL does not write
        color = {"L": 0, "RGB": 2, "LA": 4}[mode]
        ihdr = struct.pack(">IIBBBBB", 3, 2, bits, color, 0, 0, 0)
        row = bytes(1 + (3 * bits * {0: 1, 2: 3, 4: 2}[color] + 7) // 8)

        def chunk(kind, data):
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data))
            )

        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(row * 2))
            + chunk(b"IEND", b"")
        )
        size = (3, 2)
    with Image.open(path) as im:
        want = (im.mode, (im.size[1], im.size[0]))
    assert want[1] == (size[1], size[0])

    def no_pil(*_a, **_k):
        raise AssertionError("a PNG header is read without Image.open")

    monkeypatch.setattr(Image, "open", no_pil)
    assert image_header(path) == want


def test_a_png_with_a_broken_header_or_another_format_goes_through_pil(tmp_path):
    from gradindex.inputs.files import image_header

    Image.new("RGB", (6, 4)).save(tmp_path / "a.jpg")
    assert image_header(tmp_path / "a.jpg") == ("RGB", (4, 6))
    Image.new("L", (6, 4)).save(tmp_path / "b.png")
    data = bytearray((tmp_path / "b.png").read_bytes())
    data[17] ^= 0xFF  # the width, so the IHDR's CRC no longer matches: PIL refuses the file
    (tmp_path / "b.png").write_bytes(bytes(data))
    with pytest.raises(OSError):
        image_header(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the signature alone
    with pytest.raises(OSError):
        image_header(tmp_path / "c.png")
