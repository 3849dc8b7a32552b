"""gradindex add: appending equals building on everything; collisions refused; a killed add
leaves the original index as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import DDPMPipeline
from PIL import Image

import gradindex as gi
from gradindex.build.append import add_samples
from gradindex.cli.main import main
from gradindex.search.faiss_index import VectorIndex
from gradindex.store import lifecycle
from gradindex.store.vectors import VectorStore
from tests.build.test_shards import SPEC, assert_same_index, whole_build
from tests.conftest import scheduler, tiny_unet


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return whole_build(tmp_path_factory.mktemp("append"), image_seed=5)


def _first_half(setup, name, **kw):
    root, ckpts, images, _ = setup
    return gi.build_index(
        checkpoints=ckpts, data=images[:5], out=root / name, spec=SPEC, progress=False, **kw
    )


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_add_second_half_equals_whole_build(setup):
    root, _, images, whole = setup
    half = _first_half(setup, "half")
    idx = add_samples(half.path, images[5:], progress=False)
    assert_same_index(idx, whole)  # ids 5..8 continue the numbering, rows allclose, same top-k
    assert idx.manifest["num_rows"] == 9
    assert idx.manifest["added"][0]["rows"] == 4 and idx.manifest["added"][0]["first_row"] == 5
    assert idx.manifest["spec_fingerprint"] == whole.manifest["spec_fingerprint"]
    idx.verify()
    assert not any(p.name.startswith(".half") for p in root.iterdir())  # no scratch left
    res = idx.query(images[5:], k=1, method="retrac")  # new samples find themselves
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(5, 9))


def test_add_rebuilds_and_revalidates_the_asked_kind(setup):
    _, _, images, _ = setup
    half = _first_half(setup, "half_hnsw", index="hnsw")
    idx = add_samples(half.path, images[5:], progress=False)
    for method in ("tracin", "retrac"):
        info = idx.manifest["indexes"][method]
        assert info["requested_kind"] == "hnsw" and info["n"] == 9
        assert info["meets_target"] or info["fallback"]  # tuned against exact search
        exact = idx.search(idx.vectors(method), k=3, method=method, exact=True)
        approx = idx.search(idx.vectors(method), k=3, method=method)
        assert (approx.ids[:, 0] == exact.ids[:, 0]).mean() >= 0.95


def test_colliding_or_mismatched_ids_are_refused(setup, tmp_path):
    root, ckpts, images, _ = setup
    half = _first_half(setup, "half_ids")
    before = _snapshot(half.path)
    with pytest.raises(gi.SpecError, match=r"2 of the new ids are already in the index \(first: 3"):
        add_samples(half.path, images[5:7], ids=[3, 4], progress=False)
    with pytest.raises(gi.SpecError, match="ids are integers"):
        add_samples(half.path, images[5:7], ids=["a", "b"], progress=False)
    with pytest.raises(gi.SpecError, match="not unique"):
        add_samples(half.path, images[5:7], ids=[10, 10], progress=False)
    assert _snapshot(half.path) == before
    # image folders: the file names are the ids
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((images[i, 0] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    named = gi.build_index(
        checkpoints=ckpts, data=folder, out=tmp_path / "named", spec=SPEC, progress=False
    )
    with pytest.raises(gi.SpecError, match=r"already in the index \(first: '0.png'"):
        add_samples(named.path, folder, progress=False)
    with pytest.raises(gi.SpecError, match="pass ids="):
        add_samples(named.path, images[5:7], progress=False)
    grown = add_samples(named.path, images[5:7], ids=["x", "y"], progress=False)
    assert list(grown.ids) == ["0.png", "1.png", "2.png", "x", "y"]


def test_add_refuses_changed_checkpoints_and_shards(setup, tmp_path):
    root, ckpts, images, _ = setup
    half = _first_half(setup, "half_ck")
    DDPMPipeline(unet=tiny_unet(9), scheduler=scheduler()).save_pretrained(tmp_path / "c9")
    with pytest.raises(gi.ModelError, match="checkpoint 1 .* fingerprint"):
        add_samples(half.path, images[5:], checkpoints=[ckpts[0], tmp_path / "c9"], progress=False)
    shard = gi.build_index(
        checkpoints=ckpts,
        data=images,
        out=tmp_path / "s",
        spec=SPEC,
        shard=(0, 2),
        progress=False,
    )
    with pytest.raises(gi.IndexStateError, match="one shard of a sharded build"):
        add_samples(shard.path, images[5:], progress=False)


@pytest.mark.parametrize("where", ["featurizing", "search index", "swap"])
def test_a_killed_add_leaves_the_original_index_intact(setup, monkeypatch, where):
    root, _, images, whole = setup
    half = _first_half(setup, f"half_kill_{where.replace(' ', '_')}")
    before = _snapshot(half.path)

    def die(*a, **k):
        raise KeyboardInterrupt

    if where == "featurizing":
        monkeypatch.setattr(VectorStore, "write_rows", die)
    elif where == "search index":
        monkeypatch.setattr(VectorIndex, "build", die)
    else:  # everything written, killed just before the exchange
        monkeypatch.setattr(lifecycle, "_exchange", die)
    with pytest.raises(KeyboardInterrupt):
        add_samples(half.path, images[5:], progress=False)
    monkeypatch.undo()
    assert _snapshot(half.path) == before  # not a byte of the original changed
    reopened = gi.AttributionIndex.open(half.path)
    reopened.verify()
    assert len(reopened) == 5
    # a real kill would leave the staging folder behind: the next add clears it and succeeds
    stage = root / f".{half.path.name}.staging"
    stage.mkdir(exist_ok=True)
    (stage / "junk").write_text("left by a killed add")
    assert_same_index(add_samples(half.path, images[5:], progress=False), whole)
    assert not stage.exists()


def test_swap_in_without_atomic_exchange(setup, monkeypatch):
    """Where renameat2 is missing, the old folder is moved aside, then replaced."""
    root, _, images, whole = setup
    half = _first_half(setup, "half_noexchange")
    monkeypatch.setattr(lifecycle, "_exchange", lambda a, b: False)
    assert_same_index(add_samples(half.path, images[5:], progress=False), whole)
    assert not (root / ".half_noexchange.old").exists()


def test_cli_add(setup, tmp_path):
    root, _, images, whole = setup
    half = _first_half(setup, "half_cli")
    data = tmp_path / "more.npy"
    np.save(data, images[5:])
    res = CliRunner().invoke(main, ["add", str(half.path), str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["num_rows"] == 9
    assert_same_index(gi.AttributionIndex.open(half.path), whole)
    res = CliRunner().invoke(main, ["add", str(root / "missing"), str(data)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: ")
    shutil.rmtree(half.path)


CHILD = """
import sys, time
import gradindex as gi
from gradindex.search import faiss_index
from gradindex.build.append import add_samples
import numpy as np
build = faiss_index.VectorIndex.build.__func__
def stalls(cls, vectors, *a, **k):
    if len(vectors) < 9:  # the scratch build of the 4 new rows
        return build(cls, vectors, *a, **k)
    print("indexing", flush=True)  # all 9 rows are copied into the staging folder
    time.sleep(60)
faiss_index.VectorIndex.build = classmethod(stalls)
add_samples(sys.argv[1], np.load(sys.argv[2]), progress=False)
"""


def test_sigkill_during_add_leaves_the_original_index_intact(setup, tmp_path):
    import os
    import subprocess
    import sys

    root, _, images, whole = setup
    half = _first_half(setup, "half_sigkill")
    before = _snapshot(half.path)
    data = tmp_path / "more.npy"
    np.save(data, images[5:])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(half.path), str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "indexing", proc.stderr.read()[-2000:]
    finally:
        proc.kill()
        proc.wait()
    assert (root / ".half_sigkill.staging" / "vectors.h5").exists()  # killed mid-assembly
    assert _snapshot(half.path) == before
    gi.AttributionIndex.open(half.path).verify()
    assert_same_index(add_samples(half.path, images[5:], progress=False), whole)
    assert not any(p.name.startswith(".half_sigkill") for p in root.iterdir())


def test_add_to_a_class_conditional_index_keeps_labels(tmp_path, images):
    from tests.inputs.test_conditional import class_unet

    pairs = [(class_unet(1), scheduler()), (class_unet(2), scheduler())]
    labels = np.array([2, 0, 1, 2, 1, 0, 1])
    kw = dict(checkpoints=pairs, spec=SPEC, progress=False)
    whole = gi.build_index(data=images, labels=labels, out=tmp_path / "whole", **kw)
    half = gi.build_index(data=images[:4], labels=labels[:4], out=tmp_path / "half", **kw)
    grown = add_samples(half.path, images[4:], labels=labels[4:], checkpoints=pairs, progress=False)
    assert_same_index(grown, whole)
    with VectorStore.open(grown.path / "vectors.h5") as store:
        np.testing.assert_array_equal(store.column("labels"), labels)
    res = grown.query(images[4:], k=1, method="retrac", labels=labels[4:])
    np.testing.assert_array_equal(res.ids[:, 0], [4, 5, 6])


def test_a_file_that_cannot_be_decoded_adds_nothing_and_says_so(setup, tmp_path):
    """Decoded files are checked as they are featurized: a cut PNG stops the add naming it,
    with add's own advice (it has no --resume), and the index stays as it was."""
    root, _, images, _ = setup
    half = _first_half(setup, "half_bad_add")
    before = _snapshot(half.path)
    folder = tmp_path / "new"
    folder.mkdir()
    for i, img in enumerate(images[5:]):
        Image.fromarray((img[0] * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    whole = (folder / "002.png").read_bytes()
    (folder / "002.png").write_bytes(whole[: whole.index(b"IDAT") + 8])
    with pytest.raises(gi.DataError) as err:
        add_samples(half.path, str(folder), ids=np.arange(5, 9), progress=False)
    message = str(err.value)
    assert "002.png: not a readable image" in message and "nothing was added" in message
    assert "--resume" not in message and "\n" not in message
    assert _snapshot(half.path) == before
    assert not any(p.name.startswith(".half_bad_add") for p in root.iterdir())
