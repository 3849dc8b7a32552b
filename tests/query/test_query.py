"""AttributionIndex: embed reproduces stored rows, search equals brute force, checks on open."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import gradindex as gi
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet


@pytest.fixture
def built(tmp_path, images, saved_checkpoints):
    spec = gi.BuildSpec(
        proj_dim=256,
        projection="sjlt",
        timesteps=3,
        noise_draws=2,
        batch_size=4,
        checkpoint_weights=(1.0, 3.0),
    )
    idx = gi.build_index(
        checkpoints=saved_checkpoints, data=images, out=tmp_path / "idx", spec=spec, progress=False
    )
    return idx


def brute_force(rows, queries, k):
    scores = queries @ rows.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_embed_training_images_reproduces_stored_rows(built, images):
    idx = gi.AttributionIndex.open(built.path)  # reloads checkpoints from the recorded folders
    emb = idx.embed(images)
    for method in ("tracin", "retrac"):
        stored = idx.vectors(method)
        err = np.linalg.norm(emb[method] - stored, axis=1) / np.linalg.norm(stored, axis=1)
        assert err.max() <= 1e-5, (method, err.max())


def test_retrac_rows_have_norm_sqrt_of_weight_sum(built):
    norms = np.linalg.norm(built.vectors("retrac"), axis=1)
    np.testing.assert_allclose(norms, np.sqrt(1.0 + 3.0), rtol=1e-5)


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_search_equals_numpy_brute_force(built, method):
    rows = built.vectors(method)
    queries = np.random.default_rng(1).standard_normal((5, built.dim)).astype(np.float32)
    res = built.search(queries, k=4, method=method)
    scores, order = brute_force(rows, queries, 4)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.rows, order)
    np.testing.assert_array_equal(res.ids, built.ids[order])


def test_open_and_search_never_read_the_norms(built, monkeypatch):
    """The per-draw norms (N·C·K·M floats: 12 GB at 10⁸ samples) are read on first use only."""
    import h5py

    with h5py.File(built.path / "vectors.h5", "r") as f:
        on_disk = f["norms"][:]

    def refuse(self):
        raise AssertionError("norms read")

    monkeypatch.setattr(VectorStore, "norms", property(refuse))
    idx = gi.AttributionIndex.open(built.path)
    queries = np.random.default_rng(2).standard_normal((3, idx.dim)).astype(np.float32)
    for method in ("tracin", "retrac"):
        assert idx.search(queries, k=2, method=method).ids.shape == (3, 2)
    with pytest.raises(AssertionError, match="norms read"):
        idx.norms  # noqa: B018
    monkeypatch.undo()
    np.testing.assert_array_equal(idx.norms, on_disk)  # [N, C, K·M] as stored
    assert idx.norms.shape == (len(idx), 2, 6)


def test_query_a_training_image_returns_itself_first_under_retrac(built, images):
    res = built.query(images, k=1, method="retrac")
    np.testing.assert_array_equal(res.ids[:, 0], built.ids)


def test_k_bounds(built):
    q = built.vectors("tracin")[:1]
    with pytest.raises(gi.SearchError, match="k=0"):
        built.search(q, k=0, method="tracin")
    with pytest.warns(UserWarning, match="exceeds"):
        res = built.search(q, k=100, method="tracin")
    assert res.scores.shape == (1, len(built))
    with pytest.raises(gi.SearchError, match="unknown method"):
        built.search(q, k=1, method="cosine")


def test_changed_checkpoint_is_refused(built, saved_checkpoints):
    tiny_unet(99).save_pretrained(saved_checkpoints[0] / "unet")  # weights changed on disk
    idx = gi.AttributionIndex.open(built.path)
    with pytest.raises(gi.ModelError, match="fingerprint"):
        idx.embed(np.zeros((1, 1, 8, 8), np.float32))


def test_in_memory_index_needs_its_models(tmp_path, images):
    model, sched = tiny_unet(5), scheduler()
    spec = gi.BuildSpec(proj_dim=64, timesteps=2)
    gi.build_index(
        checkpoints=[(model, sched)], data=images[:3], out=tmp_path / "m", spec=spec, progress=False
    )
    idx = gi.AttributionIndex.open(tmp_path / "m")
    with pytest.raises(gi.ModelError, match="in-memory"):
        idx.embed(images[:1])
    idx = gi.AttributionIndex.open(tmp_path / "m", checkpoints=[(tiny_unet(6), sched)])
    with pytest.raises(gi.ModelError, match="fingerprint"):
        idx.embed(images[:1])
    idx = gi.AttributionIndex.open(tmp_path / "m", checkpoints=[(model, sched)])
    assert idx.embed(images[:1])["tracin"].shape == (1, 64)


def test_missing_or_partial_folders(tmp_path, built):
    with pytest.raises(gi.IndexStateError, match="no such index folder"):
        gi.AttributionIndex.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gi.IndexStateError, match="not a gradindex index"):
        gi.AttributionIndex.open(tmp_path / "empty")
    (built.path / "retrac.faiss").unlink()
    with pytest.raises(gi.IndexStateError, match="retrac.faiss"):
        gi.AttributionIndex.open(built.path)
    manifest = json.loads((built.path / "manifest.json").read_text())
    manifest["format_version"] = 999
    (built.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(gi.IndexStateError, match="format version 999"):
        gi.AttributionIndex.open(built.path)


def test_float16_store_is_close_to_float32(tmp_path, images):
    model, sched = tiny_unet(5), scheduler()
    spec = gi.BuildSpec(proj_dim=64, timesteps=2)
    a = gi.build_index(
        checkpoints=[(model, sched)], data=images, out=tmp_path / "a", spec=spec, progress=False
    )
    b = gi.build_index(
        checkpoints=[(model, sched)],
        data=images,
        out=tmp_path / "b",
        spec=spec.replace(store_dtype="float16"),
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(b.vectors("retrac"), a.vectors("retrac"), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_query_scores_the_images_rows_of_that_method(built, images, method):
    """query(images, method) is brute force of embed(images)[method] over vectors(method)."""
    test = 1.0 - images[:3]  # not training images
    res = built.query(test, k=4, method=method)
    scores, order = brute_force(built.vectors(method), built.embed(test)[method], 4)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.rows, order)
    np.testing.assert_array_equal(res.ids, built.ids[order])
    assert res.resized is None  # the model's own size


def test_query_images_with_non_finite_gradients_are_refused(tmp_path, images):
    """A model that diverges on the queries (NaN output here) gives rows that cannot be
    scored: refused in one line, not ranked."""
    model, sched = tiny_unet(5), scheduler()
    spec = gi.BuildSpec(proj_dim=64, timesteps=2)
    out = tmp_path / "m"
    gi.build_index(checkpoints=[(model, sched)], data=images[:3], out=out, spec=spec,
                   progress=False)  # fmt: skip
    model.conv_out.register_forward_hook(lambda mod, args, y: y * float("nan"))
    idx = gi.AttributionIndex.open(out, checkpoints=[(model, sched)])
    with pytest.raises(gi.SearchError, match=r"^2 query image\(s\) gave non-finite"):
        idx.query(images[3:5], k=2, method="tracin")


def test_labels_or_prompts_on_an_unconditional_index_are_refused(built, images):
    for given in ({"labels": [0]}, {"prompts": "a cat"}):
        with pytest.raises(gi.SearchError, match="unconditional: drop labels / prompts"):
            built.query(images[:1], k=1, **given)


def test_stored_rows_of_a_served_method_are_refused_naming_the_stored_ones(built):
    with pytest.raises(gi.SearchError, match="no stored rows for method 'trak'; use one of"):
        built.vectors("trak")


def test_verify_finds_a_file_changed_in_place(built):
    """A flipped bit keeps the file's size, and open never reads the norms: only verify's
    checksum finds it."""
    built.verify()
    path = built.path / "vectors.h5"
    data = bytearray(path.read_bytes())
    at = bytes(data).find(built.norms[1].tobytes())
    assert at > 0
    data[at] ^= 1  # the lowest mantissa bit of one stored norm
    path.write_bytes(data)
    idx = gi.AttributionIndex.open(built.path)  # sizes agree: it opens
    with pytest.raises(gi.IndexStateError, match="vectors.h5: checksum mismatch"):
        idx.verify()


def test_a_store_with_rows_never_written_is_refused(built):
    """vectors.h5 of a build that stopped part way (its done mask not all set): its unwritten
    rows are zeros that would rank as real samples."""
    import h5py

    with h5py.File(built.path / "vectors.h5", "r+") as f:
        f["done"][3] = 0  # in place: the file keeps its size
    with pytest.raises(gi.IndexStateError, match="rows never written; resume the build"):
        gi.AttributionIndex.open(built.path)


def test_a_torch_tensor_that_requires_grad_embeds_like_its_array(built, images):
    """A tensor straight from a model (still in the autograd graph, maybe on a GPU) is taken
    as its values."""
    import torch

    tensor = torch.from_numpy(images[:2].copy()).requires_grad_()
    emb = built.embed(tensor * 1.0)
    np.testing.assert_array_equal(emb["retrac"], built.embed(images[:2])["retrac"])
