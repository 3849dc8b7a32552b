"""search/faiss_folder.py: an index folder's FAISS files opened as backends, answering in store
rows, and refused when they are not this build's (checked on real tiny builds)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import gradindex as gi
from gradindex.errors import IndexStateError
from gradindex.search.faiss_folder import load_checked, open_faiss_backends
from gradindex.store.columns import search_rows
from gradindex.store.layout import VECTORS, read_manifest
from gradindex.store.vectors import VectorStore
from tests.conftest import scheduler, tiny_unet


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("faiss_folder")
    images = np.random.default_rng(0).random((9, 1, 8, 8), dtype=np.float32)
    out = []
    for seed in (0, 1):  # two builds of the same shape, other projections
        gi.build_index(
            checkpoints=[(tiny_unet(1), scheduler())],
            data=images,
            out=root / f"b{seed}",
            spec=gi.BuildSpec(proj_dim=16, timesteps=2, proj_seed=seed),
            progress=False,
        )
        out.append(root / f"b{seed}")
    return out


def _open(folder, method=None):
    manifest = read_manifest(folder)
    with VectorStore.open(folder / VECTORS) as store:
        rows = search_rows(store.flagged)
        if method is None:
            return open_faiss_backends(folder, manifest, store, rows, mmap=False), store_rows_of(
                folder
            )
        return load_checked(folder, manifest, method, store, rows, mmap=False)


def store_rows_of(folder):
    with VectorStore.open(folder / VECTORS) as store:
        return {m: store.vectors(m) for m in ("tracin", "retrac")}


def test_backends_answer_with_the_brute_force_top_k_in_store_rows(folders):
    backends, rows = _open(folders[0])
    assert set(backends) == {"tracin", "retrac"}
    for method, backend in backends.items():
        x = rows[method].astype(np.float64)
        q = x[[2, 5]] + 0.01
        res = backend.search(q.astype(np.float32), 4)
        want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(res.rows, want)
        np.testing.assert_allclose(res.scores, np.take_along_axis(q @ x.T, want, 1), rtol=1e-5)


def test_a_search_index_of_another_build_is_refused(tmp_path, folders):
    mixed = tmp_path / "mixed"
    shutil.copytree(folders[0], mixed)
    for name in ("tracin.faiss", "tracin.faiss.json"):
        shutil.copy(folders[1] / name, mixed / name)
    with pytest.raises(IndexStateError, match="build id .* but the manifest's is"):
        _open(mixed, "tracin")
    # the same file with this build's id: its rows still give it away
    side = json.loads((mixed / "tracin.faiss.json").read_text())
    side["info"]["build_id"] = read_manifest(mixed)["build_id"]
    (mixed / "tracin.faiss.json").write_text(json.dumps(side))
    with pytest.raises(IndexStateError, match="rows differ from vectors.h5's"):
        _open(mixed, "tracin")


def test_a_missing_or_swapped_method_file_is_refused(tmp_path, folders):
    swapped = tmp_path / "swapped"
    shutil.copytree(folders[0], swapped)
    shutil.copy(folders[0] / "retrac.faiss", swapped / "tracin.faiss")
    shutil.copy(folders[0] / "retrac.faiss.json", swapped / "tracin.faiss.json")
    with pytest.raises(IndexStateError, match="for 'retrac' .* but this index needs .* 'tracin'"):
        _open(swapped, "tracin")
    (swapped / "tracin.faiss").unlink()
    with pytest.raises(IndexStateError, match="search index missing"):
        _open(swapped, "tracin")
