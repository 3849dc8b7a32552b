"""Lazy training sources: every format gives the rows and ids of the same 300 digits, carries
their labels / captions, names a bad sample, and a shard reads only its own rows."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gradindex as gi
from gradindex.inputs.dataref import parse_data
from gradindex.inputs.slices import digest_rows, shard_rows
from gradindex.inputs.sources import ArraySource, prefetch
from gradindex.inputs.tars import expand_braces
from gradindex.inputs.training_data import open_source, source_conditioning
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet

SPEC = gi.BuildSpec(proj_dim=16, timesteps=1, batch_size=64)
N = 300
SHARDS = 3
FORMATS = ("h5", "folder", "hf_disk", "parquet", "tar")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images[:N] * 255 / 16).astype(np.uint8)  # [N, 8, 8]
    return pixels, d.target[:N].astype(np.int64)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _key(i: int) -> str:
    return f"{i:04d}"


def _caption(label: int) -> str:
    return f"a handwritten {label}"


def write_tars(root: Path, pixels: np.ndarray, labels: np.ndarray, images=None) -> str:
    """SHARDS tar shards of consecutive samples: <key>.png, <key>.cls, <key>.txt each."""
    images = images or [_png(p) for p in pixels]
    for s, rows in enumerate(np.array_split(np.arange(len(pixels)), SHARDS)):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for i in rows:
                for ext, data in (
                    (".png", images[i]),
                    (".cls", str(labels[i]).encode()),
                    (".txt", _caption(labels[i]).encode()),
                ):
                    info = tarfile.TarInfo(_key(i) + ext)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{000..{SHARDS - 1:03d}}}.tar")


def _hf_dataset(pixels: np.ndarray, labels: np.ndarray, images=None):
    import datasets

    feats = datasets.Features(
        image=datasets.Image(), id=datasets.Value("string"), label=datasets.Value("int64"),
        text=datasets.Value("string"),
    )  # fmt: skip
    images = images or [_png(p) for p in pixels]
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in images],
            "id": [_key(i) for i in range(len(pixels))],
            "label": labels.tolist(),
            "text": [_caption(v) for v in labels],
        },
        features=feats,
    )


def write_format(fmt: str, root: Path, pixels: np.ndarray, labels: np.ndarray) -> tuple[str, list]:
    """The digits in ``fmt`` under ``root``: (data argument, the ids the format names them by)."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(root / "d.npy", pixels)
        return str(root / "d.npy"), list(range(N))
    if fmt == "h5":
        with h5py.File(root / "d.h5", "w") as f:
            f["images"] = pixels
        return str(root / "d.h5") + ":/images", list(range(N))
    if fmt == "folder":
        for i, p in enumerate(pixels):
            Image.fromarray(p).save(root / f"{_key(i)}.png")
        return str(root), [f"{_key(i)}.png" for i in range(N)]
    if fmt == "hf_disk":
        _hf_dataset(pixels, labels).save_to_disk(str(root / "ds"))
        return str(root / "ds"), [_key(i) for i in range(N)]
    if fmt == "parquet":
        _hf_dataset(pixels, labels).to_parquet(str(root / "d.parquet"), batch_size=64)
        return str(root / "d.parquet"), [_key(i) for i in range(N)]
    return write_tars(root, pixels, labels), [_key(i) for i in range(N)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    pixels, labels = _digits()
    files = {fmt: write_format(fmt, root / fmt, pixels, labels) for fmt in ("npy", *FORMATS)}
    return pixels, labels, files, root


def _build(data, out, **kw):
    return gi.build_index(
        checkpoints=[(tiny_unet(1, **kw.pop("unet", {})), scheduler())], data=data, out=out,
        spec=SPEC, progress=False, fidelity_sample=0, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def npy_index(digits):
    pixels, _, files, root = digits
    return _build(files["npy"][0], root / "idx-npy")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_builds_the_rows_and_ids_of_the_npy_build(digits, npy_index, fmt):
    _, _, files, root = digits
    data, want_ids = files[fmt]
    idx = _build(data, root / f"idx-{fmt}")
    assert [str(i) for i in idx.ids] == [str(i) for i in want_ids]
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(idx.vectors(method), npy_index.vectors(method), atol=1e-5)


@pytest.mark.parametrize("fmt", ("npy", *FORMATS))
def test_each_source_reads_the_pixels_by_range(digits, fmt):
    pixels, _, files, _ = digits
    src = open_source(files[fmt][0], channels=1)
    assert len(src) == N and src.shape == (1, 8, 8) and src.dtype == np.uint8
    for a, b in ((0, 7), (95, 205), (290, 300)):
        np.testing.assert_array_equal(src.read(a, b)[:, 0], pixels[a:b])
    np.testing.assert_array_equal(src[[5, 250, 17]][:, 0], pixels[[5, 250, 17]])


@pytest.mark.parametrize("fmt", ("hf_disk", "parquet", "tar"))
def test_labels_and_captions_come_from_columns_and_members(digits, fmt):
    _, labels, files, _ = digits
    src = open_source(files[fmt][0], channels=1)
    cls = source_conditioning(src, parse_data(files[fmt][0]), "class")
    np.testing.assert_array_equal(cls.labels, labels)
    text = source_conditioning(src.rows(10, 20), parse_data(files[fmt][0]), "text")
    assert text.prompts == [_caption(v) for v in labels[10:20]]
    assert source_conditioning(src, parse_data(files[fmt][0]), "none").labels is None


def test_a_class_model_builds_with_the_tar_labels(digits):
    _, labels, files, root = digits
    idx = _build(files["tar"][0], root / "idx-cls", unet={"num_class_embeds": 10})
    with VectorStore.open(idx.path / "vectors.h5") as store:
        np.testing.assert_array_equal(store.column("labels"), labels)


def test_columns_are_named_by_flags_and_a_missing_one_is_named(digits, tmp_path):
    pixels, labels, _, _ = digits
    ds = _hf_dataset(pixels[:20], labels[:20]).rename_columns({"image": "picture", "text": "c"})
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(gi.DataError, match=r"no image column .*has: picture, id, label, c"):
        open_source(tmp_path / "ds", 1)
    with pytest.raises(gi.DataError, match=r"no column 'caption'"):
        open_source(tmp_path / "ds", 1, image_column="picture", caption_column="caption")
    src = open_source(tmp_path / "ds", 1, image_column="picture", caption_column="c")
    np.testing.assert_array_equal(src.read(0, 20)[:, 0], pixels[:20])
    assert src.prompts == [_caption(v) for v in labels[:20]]


def _broken(pixels, labels, bad):
    images = [_png(p) for p in pixels]
    images[bad] = images[bad][:40]  # a cut PNG
    return images


def test_a_corrupt_image_is_one_line_naming_it_in_every_format(digits, tmp_path):
    pixels, labels, _, _ = digits
    p, lab = pixels[:30], labels[:30]
    images = _broken(p, lab, 13)
    (tmp_path / "f").mkdir()
    for i, b in enumerate(images):
        (tmp_path / "f" / f"{_key(i)}.png").write_bytes(b)
    _hf_dataset(p, lab, images).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "t").mkdir()
    tars = write_tars(tmp_path / "t", p, lab, images)
    for data in (tmp_path / "f", tmp_path / "ds", tars):
        with pytest.raises(gi.DataError, match=r"0013(\.png)?: not a readable image") as err:
            open_source(data, 1).read(0, 30)
        assert "\n" not in str(err.value)


def test_skip_leaves_bad_samples_out_without_shifting_ids(digits, tmp_path):
    pixels, labels, _, _ = digits
    p, lab = pixels[:30], labels[:30]
    _hf_dataset(p, lab, _broken(p, lab, 13)).save_to_disk(str(tmp_path / "ds"))
    with pytest.warns(UserWarning, match="1 bad sample"):
        src = open_source(tmp_path / "ds", 1, on_error="skip")
    assert [k for k, _ in src.skipped] == ["0013"]
    keep = [i for i in range(30) if i != 13]
    assert list(src.ids) == [_key(i) for i in keep]
    np.testing.assert_array_equal(src.read(0, len(src))[:, 0], p[keep])
    np.testing.assert_array_equal(src.labels, lab[keep])


def test_an_unreadable_file_in_a_folder_is_named_or_skipped(digits, tmp_path):
    pixels, _, _, _ = digits
    for i in range(6):
        (tmp_path / f"{_key(i)}.png").write_bytes(_png(pixels[i]))
    (tmp_path / "0003.png").write_bytes(b"not an image at all")
    with pytest.raises(gi.DataError, match=r"0003\.png: not a readable image"):
        open_source(tmp_path, 1)
    with pytest.warns(UserWarning, match="1 bad sample"):
        src = open_source(tmp_path, 1, on_error="skip")
    assert [k for k, _ in src.skipped] == ["0003.png"]
    assert list(src.ids) == [f"{_key(i)}.png" for i in (0, 1, 2, 4, 5)]
    np.testing.assert_array_equal(src.read(0, 5)[:, 0], pixels[[0, 1, 2, 4, 5]])


def test_a_truncated_tar_member_is_named_or_skipped(digits, tmp_path):
    pixels, labels, _, _ = digits
    tars = write_tars(tmp_path, pixels[:30], labels[:30])
    last = tmp_path / f"shard-{SHARDS - 1:03d}.tar"
    with tarfile.open(last) as tf:
        member = tf.getmember("0029.png")
    last.write_bytes(last.read_bytes()[: member.offset_data + 10])  # cut inside 0029.png
    with pytest.raises(gi.DataError, match=r"shard-002\.tar: sample 0029: 0029\.png truncated"):
        open_source(tars, 1)
    with pytest.warns(UserWarning, match="1 bad sample"):
        src = open_source(tars, 1, on_error="skip")
    assert list(src.ids) == [_key(i) for i in range(29)]
    np.testing.assert_array_equal(src.read(0, 29)[:, 0], pixels[:29])


def test_a_label_member_missing_from_one_sample_is_named_when_labels_are_needed(digits, tmp_path):
    pixels, labels, _, _ = digits
    tars = write_tars(tmp_path, pixels[:12], labels[:12])
    first = tmp_path / "shard-000.tar"
    with tarfile.open(first) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf if m.name != "0002.cls"]
    with tarfile.open(first, "w") as tf:
        for m, data in kept:
            tf.addfile(m, io.BytesIO(data))
    src = open_source(tars, 1)
    np.testing.assert_array_equal(src.read(0, 12)[:, 0], pixels[:12])  # unconditional: fine
    assert source_conditioning(src, parse_data(tars), "text").prompts[2] == _caption(labels[2])
    with pytest.raises(gi.DataError, match=r"sample 0002 has no \.cls member"):
        source_conditioning(src.rows(0, 6), parse_data(tars), "class")
    given = source_conditioning(src, parse_data(tars), "class", labels=labels[:12])
    np.testing.assert_array_equal(given.labels, labels[:12])


def test_a_shard_reads_only_its_own_rows(digits):
    """bytes read by rows [lo, hi) of the tar source = the sizes of exactly those PNG members."""
    _, _, files, _ = digits
    sizes = {}
    for path in expand_braces(files["tar"][0]):
        with tarfile.open(path) as tf:
            sizes.update({m.name[:4]: m.size for m in tf if m.name.endswith(".png")})
    src = open_source(files["tar"][0], 1)
    for i, n in ((0, 4), (3, 4)):
        lo, hi = shard_rows((i, n), N)
        view = src.rows(lo, hi)
        for a in range(0, len(view), 64):
            view.read(a, a + 64)
        assert view.bytes_read == sum(sizes[_key(r)] for r in range(lo, hi))


def test_prefetch_yields_every_batch_in_order_and_raises_a_read_error(digits, tmp_path):
    pixels, _, files, _ = digits
    src = open_source(files["folder"][0], 1)
    spans = [(a, min(a + 64, N)) for a in range(0, N, 64)]
    got = list(prefetch(src, iter(spans)))
    assert [(a, b) for a, b, _ in got] == spans
    np.testing.assert_array_equal(np.concatenate([x for *_, x in got])[:, 0], pixels)
    (tmp_path / "f").mkdir()
    for i in range(10):
        (tmp_path / "f" / f"{i}.png").write_bytes(_png(pixels[i]))
    src = open_source(tmp_path / "f", 1)
    (tmp_path / "f" / "7.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(gi.DataError, match=r"7\.png: not a readable image"):
        list(prefetch(src, iter([(0, 5), (5, 10)])))


def test_brace_lists_expand_like_bash():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == [
        "a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar",
    ]  # fmt: skip


@pytest.mark.parametrize("layout", ("nhwc", "fortran", "float16"))
def test_npy_row_ranges_equal_np_load(tmp_path, layout):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (23, 6, 5, 3), dtype=np.uint8)
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    if layout == "float16":
        arr = (arr / 255).astype(np.float16)
    np.save(tmp_path / "a.npy", arr)
    src = open_source(tmp_path / "a.npy", 3)
    want = np.moveaxis(np.load(tmp_path / "a.npy"), -1, 1)
    assert src.shape == (3, 6, 5) and src.dtype == arr.dtype and len(src) == 23
    np.testing.assert_array_equal(src.read(4, 17), want[4:17])
    assert src.bytes_read == want[4:17].nbytes


def test_a_shard_build_reads_only_its_rows(digits, tmp_path):
    """build_index(shard=(1, 4)) over the tars: every byte it reads is its own rows' images,
    each decoded once, as it is featurized (no pass decoding everything first), plus the
    shard's first row again (checked before anything is written) and the data set's first
    sample, decoded once to learn the image shape, and the few rows of the data set whose pixels
    its data digest reads (``gradindex.inputs.slices.data_digest``)."""
    _, _, files, _ = digits
    sizes = {}
    for path in expand_braces(files["tar"][0]):
        with tarfile.open(path) as tf:
            sizes.update({m.name[:4]: m.size for m in tf if m.name.endswith(".png")})
    src = open_source(files["tar"][0], 1)
    idx = _build(src, tmp_path / "s1", shard=(1, 4))
    lo, hi = shard_rows((1, 4), N)
    assert list(idx.ids) == [_key(i) for i in range(lo, hi)]
    own = sum(sizes[_key(i)] for i in range(lo, hi))
    digest = sum(sizes[_key(i)] for i in digest_rows(N))  # merge's check: same data, same order
    assert src.bytes_read == own + sizes[_key(lo)] + sizes[_key(0)] + digest


@pytest.mark.parametrize("fmt", ("tar", "parquet"))
def test_cli_builds_from_tars_and_parquet_and_bad_data_is_one_error_line(
    digits, tmp_path, saved_checkpoints, fmt
):
    from click.testing import CliRunner

    from gradindex.cli.main import main

    _, _, files, _ = digits
    data, want_ids = files[fmt]
    args = ["build", "-c", str(saved_checkpoints[0]), "--proj-dim", "16", "--timesteps", "1"]
    res = CliRunner().invoke(main, [*args, "--data", data, "--out", str(tmp_path / "i")])
    assert res.exit_code == 0, res.output
    assert [str(i) for i in _index_ids(tmp_path / "i")] == want_ids
    res = CliRunner().invoke(main, [*args, "--data", str(tmp_path / "no-{0..1}.tar"),
                                    "--out", str(tmp_path / "j")])  # fmt: skip
    assert res.exit_code != 0 and res.output.startswith("Error: ") and "no-0.tar" in res.output
    assert len(res.output.strip().splitlines()) == 1


def _index_ids(folder):
    return list(gi.AttributionIndex.open(folder).ids)


class _WatchedSource(ArraySource):
    """An array source that records which spans have started and finished reading, as events
    the consumer can wait on (no clock involved)."""

    def __init__(self, array: np.ndarray, spans: list[tuple[int, int]]):
        super().__init__(array)
        self.started = {a: threading.Event() for a, _ in spans}
        self.done = {a: threading.Event() for a, _ in spans}

    def _read(self, start: int, stop: int) -> np.ndarray:
        self.started[start].set()
        rows = super()._read(start, stop)
        self.done[start].set()
        return rows


@pytest.mark.parametrize("depth", (1, 2))
def test_prefetch_reads_the_next_batch_while_this_one_is_used_and_no_further_than_depth(depth):
    """While the consumer holds batch i, the reader thread finishes batch i+1 (the read is
    hidden behind the featurizing); it starts nothing past i + depth + 1 (depth batches queued
    and one in hand), so memory stays bounded however slow the consumer. Batches arrive in
    order with their own rows; the timing record is filled."""
    spans = [(a, a + 2) for a in range(0, 12, 2)]
    array = np.arange(12 * 16, dtype=np.uint8).reshape(12, 1, 4, 4)
    source = _WatchedSource(array, spans)
    timing: dict[str, float] = {}
    got = []
    for i, (a, b, rows) in enumerate(prefetch(source, spans, depth=depth, timing=timing)):
        got.append((a, b))
        np.testing.assert_array_equal(rows, array[a:b])
        if i + 1 < len(spans):  # read ahead: without it this waits forever (10 s, then fails)
            assert source.done[spans[i + 1][0]].wait(10), f"batch {i + 1} not read during {i}"
        beyond = i + depth + 2
        if beyond < len(spans):  # never set while batch i is held, however long we wait
            assert not source.started[spans[beyond][0]].wait(0.2), (i, beyond)
    assert got == spans
    assert set(timing) == {"reading_s", "waiting_s"} and min(timing.values()) >= 0


def test_decoded_16bit_files_take_their_range_without_a_decode_and_arrays_are_scanned(tmp_path):
    """A folder of 8- and 16-bit PNGs is float (both scaled into [0, 1]); its data range is
    the rule's answer on the decoded pixels, found without decoding one. A dataset whose image
    column holds float arrays is not 'decoded': its range comes from its values."""
    import datasets

    from gradindex.inputs.ranges import range_of_bounds, value_bounds

    rng = np.random.default_rng(3)
    folder = tmp_path / "w"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "4.png")
    src = open_source(folder, 1)
    assert src.dtype == np.float32 and src.decodes
    assert src.data_range() == (0.0, 1.0) and src.bytes_read == 0
    assert range_of_bounds(*value_bounds(src.read(0, 5))) == src.data_range()
    wide = (rng.random((3, 8, 8)) * 2 - 1).astype(np.float32)  # values in [-1, 1]
    feats = datasets.Features(image=datasets.Array2D((8, 8), "float32"))
    datasets.Dataset.from_dict({"image": list(wide)}, features=feats).save_to_disk(tmp_path / "a")
    arrays = open_source(tmp_path / "a", 1)
    assert not arrays.decodes and arrays.data_range() == (-1.0, 1.0)


def test_a_hub_layout_parquet_folder_builds_the_rows_of_the_image_folder(digits, npy_index):
    """The Hub keeps a dataset's parquet files under data/ (one file per split): the folder
    builds the train split's rows, as the image folder does, and its test rows stay out."""
    pixels, labels, files, root = digits
    hub = root / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: mit\n---\n")
    _hf_dataset(pixels, labels).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    _hf_dataset(pixels[:5][::-1], labels[:5]).to_parquet(
        str(hub / "data" / "test-00000-of-00001.parquet")
    )
    idx = _build(str(hub), root / "idx-hub")
    assert [str(i) for i in idx.ids] == [_key(i) for i in range(N)]
    folder = _build(files["folder"][0], root / "idx-folder-hub")
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(idx.vectors(method), folder.vectors(method), atol=1e-5)
        np.testing.assert_allclose(idx.vectors(method), npy_index.vectors(method), atol=1e-5)
    test = open_source(str(hub), channels=1, split="test")
    np.testing.assert_array_equal(test.read(0, 5)[:, 0], pixels[:5][::-1])
    with pytest.raises(gi.DataError, match=r"splits \['test', 'train'\]; name one"):
        open_source(str(hub), channels=1, split="validation")


def test_an_imagefolder_with_metadata_csv_carries_its_captions(tmp_path):
    """diffusers' text_to_image reads `imagefolder` datasets, whose captions may sit in a
    metadata.csv (file_name, text) as well as a metadata.jsonl."""
    pixels, labels = _digits()
    folder = tmp_path / "train"
    (folder / "sub").mkdir(parents=True)
    names = [f"{_key(i)}.png" if i % 2 else f"sub/{_key(i)}.png" for i in range(6)]
    for name, p in zip(names, pixels[:6], strict=True):
        Image.fromarray(p).save(folder / name)
    import csv

    with (folder / "metadata.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text", "extra"])
        for name, v in zip(names, labels[:6], strict=True):
            w.writerow([name, _caption(v) + ", with a comma", "x"])
    src = open_source(str(folder), channels=1)
    cond = source_conditioning(src, parse_data(folder), "text")
    by_name = {n: _caption(v) + ", with a comma" for n, v in zip(names, labels[:6], strict=True)}
    assert cond.prompts == [by_name[str(i)] for i in src.ids]
    (folder / "metadata.csv").write_text("name,caption\nsub/0000.png,a\n")
    with pytest.raises(gi.DataError, match="needs the columns file_name and text"):
        source_conditioning(src, parse_data(folder), "text")


def test_build_help_names_every_data_format():
    from click.testing import CliRunner

    from gradindex.cli.main import main

    text = " ".join(CliRunner().invoke(main, ["build", "--help"]).output.split())
    for fmt in (".npy/.npz", "file.h5:/dataset", "folder of images", "save_to_disk", ".parquet",
                "data/*.parquet", ".tar"):  # fmt: skip
        assert fmt in text, fmt
