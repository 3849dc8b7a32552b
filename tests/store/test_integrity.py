"""Opening an index checks that its files belong together and stay inside its folder.

Files of another build with the same shape (so every recorded size still matches), a spec edited
by hand, manifest entries naming files outside the folder, links out of it, checkpoint configs
naming classes that are no model: each is refused on open with one line naming the file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradindex as gi
from gradindex.cli.main import main
from gradindex.errors import IndexStateError, ModelError, SearchError, SpecError
from gradindex.inputs.models import load_checkpoint
from gradindex.search.faiss_index import VectorIndex
from gradindex.spec import BuildSpec
from gradindex.store.layout import write_json_atomic
from tests.conftest import scheduler, tiny_unet

MAX_ROW_DIM = 1 << 20  # faiss/impl/index_read.cpp: d < (1 << 20) + 1 (measured below)


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """Two finished indexes of one model and data, the same shape, noise drawn with seeds 0/1."""
    root = tmp_path_factory.mktemp("two")
    images = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    pair = (tiny_unet(1), scheduler())
    for name, seed in (("a", 0), ("b", 1)):
        spec = BuildSpec(proj_dim=64, timesteps=2, seed=seed, batch_size=6)
        gi.build_index(checkpoints=[pair], data=images, out=root / name, spec=spec, progress=False)
    return root


@pytest.fixture
def ab(two_builds, tmp_path):
    """Fresh copies of the two folders for one test to alter."""
    return tuple(shutil.copytree(two_builds / n, tmp_path / n) for n in ("a", "b"))


def same_size(a: Path, b: Path, name: str) -> None:
    """The recorded-size check alone cannot tell the two files apart."""
    assert (a / name).stat().st_size == (b / name).stat().st_size


def test_untouched_copies_open_and_answer_like_numpy(ab):
    a, _ = ab
    idx = gi.AttributionIndex.open(a)
    rows = idx.vectors("tracin")
    q = np.random.default_rng(1).standard_normal((2, idx.dim)).astype(np.float32)
    want = np.argsort(-(q @ rows.T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(idx.search(q, k=3, method="tracin").rows, want)


def test_vectors_of_another_build_are_refused(ab):
    a, b = ab
    same_size(a, b, "vectors.h5")
    shutil.copyfile(b / "vectors.h5", a / "vectors.h5")
    with pytest.raises(IndexStateError, match=r"vectors\.h5: build id .* another build"):
        gi.AttributionIndex.open(a)


def test_vectors_of_another_seed_are_refused_without_build_ids(ab):
    """Files of a version that recorded no build id: the store's own spec (seed) still differs."""
    a, b = ab
    shutil.copyfile(b / "vectors.h5", a / "vectors.h5")
    with h5py.File(a / "vectors.h5", "r+") as f:
        f.attrs.pop("build_id", None)
    manifest = json.loads((a / "manifest.json").read_text())
    manifest.pop("build_id", None)
    manifest["files"]["vectors.h5"]["bytes"] = (a / "vectors.h5").stat().st_size
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match=r"vectors\.h5: built with another spec.*seed 1 vs 0"):
        gi.AttributionIndex.open(a)


@pytest.mark.parametrize("with_sidecar", [True, False])
def test_faiss_file_of_another_build_is_refused(ab, with_sidecar):
    a, b = ab
    same_size(a, b, "retrac.faiss")
    names = ["retrac.faiss", "retrac.faiss.json"] if with_sidecar else ["retrac.faiss"]
    for name in names:
        shutil.copyfile(b / name, a / name)
    why = "build id" if with_sidecar else "its rows differ from vectors.h5's"
    with pytest.raises(IndexStateError, match=rf"retrac\.faiss(\.json)?: {why}"):
        gi.AttributionIndex.open(a)


def test_faiss_file_of_another_metric_is_refused(ab):
    """The same rows under L2 distance would rank by distance, not by score."""
    a, _ = ab
    old = faiss.read_index(str(a / "tracin.faiss"))
    l2 = faiss.IndexFlatL2(old.d)
    l2.add(old.reconstruct_n(0, old.ntotal))
    faiss.write_index(l2, str(a / "tracin.faiss"))
    with pytest.raises(IndexStateError, match=r"tracin\.faiss: .*metric 1.*metric 0"):
        gi.AttributionIndex.open(a)


@pytest.mark.parametrize("field,value", [("seed", 5), ("proj_seed", 3), ("timesteps", 3)])
def test_spec_edited_in_the_manifest_is_refused(ab, field, value):
    a, _ = ab
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["spec"][field] = value
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match=r"manifest\.json: spec has fingerprint .* edited"):
        gi.AttributionIndex.open(a)
    res = CliRunner().invoke(main, ["info", str(a)])
    assert res.exit_code != 0 and "Error:" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "edit,what",
    [
        (lambda m: m.update(timesteps=[100, 900]), "timesteps"),
        (lambda m: m["checkpoints"][0].update(weight=100.0), "checkpoint weights"),
        (lambda m: m.update(num_flagged=5), "num_flagged"),
        (lambda m: m.update(checkpoints=None), "no readable checkpoint records"),
    ],
)
def test_records_edited_in_the_manifest_are_refused(ab, edit, what):
    """Records that follow from the spec and the store (what info shows) must agree with them."""
    a, _ = ab
    manifest = json.loads((a / "manifest.json").read_text())
    edit(manifest)
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match=rf"manifest\.json: .*{what}"):
        gi.AttributionIndex.open(a)
    res = CliRunner().invoke(main, ["info", str(a)])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("edit", "what"),
    [
        (lambda m: m.update(complete=False), r"manifest\.json: index is not marked complete"),
        (lambda m: m.pop("complete"), r"manifest\.json: index is not marked complete"),
        (lambda m: m["files"]["vectors.h5"].update(ids_sha256="x"), "unreadable ids digests"),
        (lambda m: m["files"]["vectors.h5"].update(ids_sha256=[1]), "unreadable ids digests"),
        (lambda m: m["files"]["tracin.faiss"].pop("bytes"), "tracin.faiss: no size recorded"),
        (lambda m: m["files"]["retrac.faiss"].update(bytes="9"), "retrac.faiss: no size recorded"),
    ],
)
def test_an_unfinished_manifest_or_unreadable_file_records_are_refused(ab, edit, what):
    a, _ = ab
    manifest = json.loads((a / "manifest.json").read_text())
    edit(manifest)
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match=what):
        gi.AttributionIndex.open(a)


@pytest.mark.parametrize("name", ["../outside.bin", "absolute"])
def test_manifest_naming_a_file_outside_the_folder_is_refused(ab, tmp_path, name):
    a, _ = ab
    name = str(tmp_path / "abs.bin") if name == "absolute" else name
    target = (a / name).resolve()  # an absolute name replaces the folder
    target.write_bytes(b"secret\n")
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": target.stat().st_size, "sha256": "0" * 64}
    (a / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match="no file of an index"):
        gi.AttributionIndex.open(a)
    res = CliRunner().invoke(main, ["info", str(a), "--verify"])
    assert res.exit_code != 0 and "no file of an index" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_link_out_of_the_folder_is_refused(ab, tmp_path):
    """The very same bytes, but read through a link pointing outside the index."""
    a, _ = ab
    outside = tmp_path / "elsewhere.h5"
    shutil.move(a / "vectors.h5", outside)
    (a / "vectors.h5").symlink_to(outside)
    with pytest.raises(IndexStateError, match=r"vectors\.h5: a link to .*outside the index"):
        gi.AttributionIndex.open(a)


def test_link_inside_the_folder_is_accepted(ab):
    a, _ = ab
    (a / "vectors.h5").rename(a / "vectors.h5.real")
    (a / "vectors.h5").symlink_to("vectors.h5.real")
    assert len(gi.AttributionIndex.open(a)) == 6


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_json_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "m.json", {"x": 1})
        open(tmp_path / "plain.json", "w").close()  # what an ordinary write gives
    finally:
        os.umask(old)
    mode = (tmp_path / "m.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain.json").stat().st_mode & 0o777


def test_manifest_has_the_mode_of_the_other_files(two_builds):
    modes = {p.name: p.stat().st_mode & 0o777 for p in (two_builds / "a").iterdir()}
    assert len(set(modes.values())) == 1, modes


# -- checkpoint configs name model classes only ---------------------------------------------


@pytest.mark.parametrize("cls_name", ["DDPMPipeline", "DDPMScheduler", "logging", "__class__"])
def test_model_config_naming_no_model_class_is_refused(tmp_path, cls_name):
    folder = tmp_path / "ckpt"
    tiny_unet(1).save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    cfg = folder / "unet" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": cls_name}))
    with pytest.raises(ModelError, match="is not a diffusers model class"):
        load_checkpoint(folder)


def test_scheduler_config_naming_a_model_class_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    tiny_unet(1).save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    cfg = folder / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "UNet2DModel"}))
    with pytest.raises(ModelError, match="is not a diffusers scheduler class"):
        load_checkpoint(folder)


def test_model_config_naming_a_model_class_loads(tmp_path):
    folder = tmp_path / "ckpt"
    model = tiny_unet(1)
    model.save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    ckpt = load_checkpoint(folder)
    assert type(ckpt.model) is type(model)


# -- rows too wide for FAISS are refused before anything is computed ------------------------


def test_faiss_cannot_read_an_index_wider_than_the_limit(tmp_path):
    """The limit itself, measured on the installed FAISS: written fine, unreadable."""
    for d, readable in ((MAX_ROW_DIM, True), (MAX_ROW_DIM + 1, False)):
        index = faiss.IndexFlatIP(d)
        faiss.write_index(index, str(tmp_path / "x.faiss"))
        if readable:
            assert faiss.read_index(str(tmp_path / "x.faiss")).d == d
        else:
            with pytest.raises(RuntimeError):
                faiss.read_index(str(tmp_path / "x.faiss"))


@pytest.mark.parametrize(
    "spec,num_params,ckpts,ok",
    [
        (BuildSpec(projection="identity"), 620_000, 3, False),  # the demo UNet x 3
        (BuildSpec(projection="identity"), MAX_ROW_DIM // 2, 2, True),
        (BuildSpec(projection="identity"), MAX_ROW_DIM // 2 + 1, 2, False),
        (BuildSpec(proj_dim=4096), 10**9, 3, True),
        (BuildSpec(proj_dim=1 << 19, projection="gaussian"), 10**9, 3, False),
    ],
)
def test_row_width_check(spec, num_params, ckpts, ok):
    width = (num_params if spec.projection == "identity" else spec.proj_dim) * ckpts
    assert (width <= MAX_ROW_DIM) == ok
    if ok:
        assert spec.check_row_dim(num_params, ckpts) == width
    else:
        with pytest.raises(SpecError, match="more than the 1,048,576 a FAISS index can hold"):
            spec.check_row_dim(num_params, ckpts)


def test_identity_build_too_wide_is_refused_before_featurizing(tmp_path, monkeypatch):
    """A model whose three checkpoints would give 3 x 400k identity columns: refused with the
    fix before any gradient is taken and before the folder is touched."""
    import gradindex.build.pipeline as build

    big = torch.nn.Linear(1000, 400)  # 400,400 parameters
    model = tiny_unet(1)
    model.register_module("extra", big)

    def no_featurizing(*a, **k):
        raise AssertionError("featurized")

    monkeypatch.setattr(build, "Embedder", no_featurizing)
    images = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(SpecError, match=r"projection='sjlt', proj_dim=4096"):
        gi.build_index(
            checkpoints=[(model, scheduler())] * 3,
            data=images,
            out=tmp_path / "wide",
            spec=BuildSpec(projection="identity", timesteps=1),
            progress=False,
        )
    assert not (tmp_path / "wide").exists()


# -- retrac search over rows of unequal norms ------------------------------------------------


def heavy_tailed(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.pareto(1.5, (n, 1))).astype(np.float32)


def test_retrac_over_rows_of_unequal_norms_is_refused():
    x = heavy_tailed(2000, 16, 0)
    with pytest.raises(SearchError, match="rows of one norm.*method 'tracin'"):
        VectorIndex.build(x, "retrac", kind="flat")
    VectorIndex.build(x, "tracin", kind="flat")  # raw inner product: fine


def test_ondisk_retrac_over_rows_of_unequal_norms_is_refused(tmp_path):
    from gradindex.search.ondisk import build_ondisk
    from gradindex.store.vectors import ChunkedRows

    x = heavy_tailed(3000, 8, 0)
    x[:1000] /= np.linalg.norm(x[:1000], axis=1, keepdims=True)  # the first chunk looks fine
    with pytest.raises(SearchError, match="rows of one norm"):
        build_ondisk(ChunkedRows(x, chunk_rows=1000), tmp_path / "od.faiss", "retrac")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_retrac_over_normalized_rows_equals_numpy_cosine(kind):
    x = heavy_tailed(2000, 16, 1)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = heavy_tailed(20, 16, 2)
    cos = (q @ x.T) / np.linalg.norm(q, axis=1, keepdims=True) / np.linalg.norm(x, axis=1)
    truth = np.argsort(-cos, axis=1, kind="stable")[:, :10]
    vi = VectorIndex.build(unit, "retrac", kind=kind, target_recall=0.8, on_miss="warn")
    res = vi.search(q, 10)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(res.rows, truth, strict=True)])
    assert recall >= (1.0 if kind == "flat" else 0.8), recall


def test_retrac_accepts_float16_rounded_rows():
    """Rows of one norm stored as float16 differ in norm by rounding only."""
    x = heavy_tailed(500, 32, 3)
    x = (2.0 * x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    assert np.ptp(np.linalg.norm(x.astype(np.float32), axis=1)) > 0
    assert VectorIndex.build(x.astype(np.float32), "retrac", kind="flat").ntotal == 500


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_sample_rows_are_the_rows_given(kind):
    x = heavy_tailed(3000, 8, 4)
    vi = VectorIndex.build(x, "tracin", kind=kind, target_recall=0.5, on_miss="warn")
    assert vi.info["kind"] == kind
    rows, stored = vi.sample_rows()
    assert len(rows) >= 1
    np.testing.assert_array_equal(stored, x[rows])


@pytest.mark.parametrize("name", ["retrac.faiss", "vectors.h5"])
def test_a_truncated_file_is_refused_naming_its_sizes(ab, name):
    """A copy cut short (an interrupted transfer) is named as such, not as a read error."""
    a, _ = ab
    size = (a / name).stat().st_size
    with open(a / name, "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(IndexStateError, match=rf"{name}: {size - 4} bytes, expected {size} "):
        gi.AttributionIndex.open(a)
