"""Images prepared as diffusers' trainers prepare them: torchvision's Resize(resolution,
BILINEAR) + CenterCrop(resolution) on PIL images, for training rows and queries alike.

The reference is written here from torchvision's definitions (its ``resize`` computes the
size with the shorter side ``resolution`` and the longer one ``int(resolution * long /
short)``, returns the image unchanged at that size, else calls ``PIL.Image.resize``;
``center_crop`` crops at ``int(round((size - crop) / 2.0))``) on PIL images opened from the
files, independently of gradindex.inputs.prepare."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import gradindex as gi
from gradindex.cli.main import main
from gradindex.inputs.prepare import prepare_image
from gradindex.inputs.training_data import open_source
from tests.conftest import scheduler, tiny_unet

R = 8  # the tiny UNet's sample size
SIZES = [(8, 8), (13, 21), (21, 13), (9, 30), (16, 16), (11, 11), (8, 15)]  # (H, W)


def torchvision_like(im: Image.Image, size: int) -> Image.Image:
    """Resize(size) then CenterCrop(size), as torchvision defines them for PIL images."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of grayscale PNGs of mixed sizes and shapes, and the reference rows."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    folder = root / "train"
    folder.mkdir()
    want = []
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(len(SIZES)):
        with Image.open(folder / f"{i}.png") as im:
            want.append(np.asarray(torchvision_like(im.convert("L"), R)))
    np.save(root / "want.npy", np.stack(want)[:, None])  # [N, 1, R, R] uint8
    return root, folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A pipeline-layout checkpoint folder of the tiny UNet."""
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_unet(1).save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    return folder


def _build(ckpt, data, out, **spec):
    return gi.build_index(
        checkpoints=[ckpt], data=data, out=out, progress=False,
        spec=gi.BuildSpec(proj_dim=16, timesteps=2, batch_size=4, **spec), fidelity_sample=0,
    )  # fmt: skip


def test_prepare_image_is_torchvisions_resize_and_center_crop():
    rng = np.random.default_rng(1)
    for h, w in [*SIZES, (5, 5), (7, 33), (40, 9)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(torchvision_like(Image.fromarray(rgb, "RGB"), R))
        got = prepare_image(np.moveaxis(rgb, -1, 0), R)
        assert got.dtype == np.uint8 and got.shape == (3, R, R)
        np.testing.assert_array_equal(np.moveaxis(got, 0, -1), want)
    wide = rng.random((1, 10, 25), dtype=np.float32)  # a 16-bit file's floats: per channel 'F'
    want = np.asarray(torchvision_like(Image.fromarray(wide[0], "F"), R))
    np.testing.assert_allclose(prepare_image(wide, R)[0], want, rtol=0, atol=0)


def test_a_folder_of_mixed_sizes_builds_the_rows_of_the_prepared_images(mixed, ckpt, tmp_path):
    root, folder = mixed
    want = _build(ckpt, str(root / "want.npy"), tmp_path / "want")
    idx = _build(ckpt, str(folder), tmp_path / "folder", resolution=R, center_crop=True)
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(idx.vectors(method), want.vectors(method), atol=1e-6)
    spec = json.loads((tmp_path / "folder" / "manifest.json").read_text())["spec"]
    assert spec["resolution"] == R and spec["center_crop"] is True
    src = open_source(str(folder), 1, resolution=R, center_crop=True)
    np.testing.assert_array_equal(src.read(0, len(SIZES)), np.load(root / "want.npy"))


def test_queries_are_prepared_as_the_training_images_were(mixed, ckpt, tmp_path):
    root, folder = mixed
    idx = _build(ckpt, str(folder), tmp_path / "folder", resolution=R)
    for i in (1, 3):  # a training image as its file holds it finds its own stored row
        with Image.open(folder / f"{i}.png") as im:
            raw = np.asarray(im)[None, None]  # [1, 1, H, W] at the file's own size
        np.testing.assert_allclose(
            idx.embed(raw)["tracin"][0], idx.vectors("tracin")[i], rtol=1e-4, atol=1e-5
        )
        assert idx.resized_from(raw) is None  # prepared to the model's size, not stretched
    # the CLI reads a query folder of mixed sizes as the build read it: each image finds itself
    res = CliRunner().invoke(main, ["query", str(tmp_path / "folder"), str(folder),
                                    "-k", "1", "--method", "retrac", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    found = [json.loads(line) for line in res.output.splitlines()]
    assert [r["ids"][0] for r in found] == [f"{i}.png" for i in range(len(SIZES))]


def test_the_cli_takes_resolution_and_center_crop_and_defaults_change_nothing(
    mixed, ckpt, tmp_path
):
    root, folder = mixed
    args = ["build", "-c", str(ckpt), "--proj-dim", "16", "--timesteps", "2",
            "--fidelity-sample", "0"]  # fmt: skip
    res = CliRunner().invoke(main, [*args, "-d", str(folder), "-o", str(tmp_path / "a"),
                                    "--resolution", "8", "--center-crop"])  # fmt: skip
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "a" / "manifest.json").read_text())["spec"]
    assert (spec["resolution"], spec["center_crop"]) == (8, True)
    res = CliRunner().invoke(main, [*args, "-d", str(folder), "-o", str(tmp_path / "b")])
    assert res.exit_code != 0 and "images differ in size" in res.output  # as before
    assert "resolution" not in gi.BuildSpec().to_dict()  # old specs keep their fingerprint
    res = CliRunner().invoke(main, [*args, "-d", str(folder), "-o", str(tmp_path / "c"),
                                    "--center-crop"])  # fmt: skip
    assert res.output.startswith("Error: BuildSpec.center_crop=True: needs resolution")
    res = CliRunner().invoke(main, [*args, "-d", str(folder), "-o", str(tmp_path / "c"),
                                    "--resolution", "0"])  # fmt: skip
    assert res.output.startswith("Error: BuildSpec.resolution=0: must be a positive integer")


def test_added_images_are_prepared_as_the_index_was(mixed, ckpt, tmp_path):
    """gradindex add reads a folder of mixed sizes with the index's resolution."""
    import shutil

    from gradindex.build.append import add_samples

    root, folder = mixed
    first, more = tmp_path / "first", tmp_path / "more"
    first.mkdir(), more.mkdir()
    for i in range(len(SIZES)):
        shutil.copy(folder / f"{i}.png", (first if i < 4 else more) / f"{i}.png")
    whole = _build(ckpt, str(folder), tmp_path / "whole", resolution=R)
    _build(ckpt, str(first), tmp_path / "grown", resolution=R)
    grown = add_samples(tmp_path / "grown", str(more), progress=False)
    assert [str(i) for i in grown.ids] == [f"{i}.png" for i in range(len(SIZES))]
    np.testing.assert_allclose(
        grown.vectors("tracin"), whole.vectors("tracin"), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("fmt", ("parquet", "tar"))
def test_datasets_and_tars_of_mixed_sizes_read_as_the_prepared_images(mixed, tmp_path, fmt):
    import io
    import tarfile

    root, folder = mixed
    pngs = [(folder / f"{i}.png").read_bytes() for i in range(len(SIZES))]
    if fmt == "parquet":
        import datasets

        feats = datasets.Features(image=datasets.Image(), id=datasets.Value("string"))
        rows = {"image": [{"bytes": b, "path": None} for b in pngs], "id": [str(i) for i in
                range(len(pngs))]}  # fmt: skip
        data = str(tmp_path / "d.parquet")
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(data)
    else:
        data = str(tmp_path / "d.tar")
        with tarfile.open(data, "w") as tf:
            for i, b in enumerate(pngs):
                info = tarfile.TarInfo(f"{i:03d}.png")
                info.size = len(b)
                tf.addfile(info, io.BytesIO(b))
    src = open_source(data, 1, resolution=R, center_crop=True)
    np.testing.assert_array_equal(src.read(0, len(SIZES)), np.load(root / "want.npy"))


def test_the_browser_shows_training_images_as_the_index_prepared_them(mixed, ckpt, tmp_path):
    pytest.importorskip("starlette")
    from gradindex.serve.state import ServeState

    root, folder = mixed
    _build(ckpt, str(folder), tmp_path / "idx", resolution=R, center_crop=True)
    state = ServeState(gi.AttributionIndex.open(tmp_path / "idx"))
    want = np.load(root / "want.npy")
    for row in (1, 3):
        np.testing.assert_array_equal(state.images.image(row), want[row])
