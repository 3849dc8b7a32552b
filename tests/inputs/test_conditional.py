"""Class-conditional UNet2DModel: stored rows against an independent per-sample autograd loop
(both gradient backends), labels travelling with the data, self-retrieval, bad input."""

from __future__ import annotations

import functools
import json

import h5py
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

import gradindex as gi
from gradindex.inputs.query_images import load_images
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows, rel_err

NUM_CLASSES = 3


def class_unet(seed: int) -> UNet2DModel:
    """A tiny class-conditional UNet2DModel (label lookup table of 3 classes)."""
    return tiny_unet(seed, num_class_embeds=NUM_CLASSES)


LABELS = np.array([2, 0, 1, 2, 1])


def test_class_rows_match_autograd_loop(tmp_path, images, backend):
    sched = scheduler()
    models = [class_unet(1), class_unet(2)]
    weights = (0.5, 2.0)
    spec = gi.BuildSpec(
        projection="identity", timesteps=2, noise_draws=2, checkpoint_weights=weights, batch_size=3
    )
    imgs = images[:5]
    idx = gi.build_index(
        checkpoints=[(m, sched) for m in models],
        data=imgs,
        labels=LABELS,
        out=tmp_path / "idx",
        spec=spec,
        progress=False,
    )
    assert idx._get_embedder().featurizers[0].backend == backend
    x0s = torch.from_numpy(imgs) * 2 - 1
    conds = [{"class_labels": torch.tensor([int(y)])} for y in LABELS]
    ref_t, ref_r, ref_n = reference_rows(models, sched, x0s, conds, idx.spec, weights)
    assert rel_err(idx.vectors("tracin"), ref_t).max() <= 1e-4
    assert rel_err(idx.vectors("retrac"), ref_r).max() <= 1e-4
    np.testing.assert_allclose(idx.norms, ref_n, rtol=1e-4)
    # stored with the rows, readable with plain h5py
    with h5py.File(tmp_path / "idx" / "vectors.h5", "r") as f:
        np.testing.assert_array_equal(f["labels"][()], LABELS)
    assert idx.conditioning["kind"] == "class" and idx.conditioning["num_classes"] == NUM_CLASSES


def test_labels_from_npz_self_retrieval_and_query_labels(tmp_path, images):
    sched = scheduler()
    model = class_unet(3)
    path = tmp_path / "train.npz"
    np.savez(path, images=images, labels=np.array([0, 1, 2, 0, 1, 2, 0]))
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=4)
    idx = gi.build_index(
        checkpoints=[(model, sched)], data=str(path), out=tmp_path / "i", spec=spec, progress=False
    )
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    res = idx.query(images, k=1, method="retrac", labels=labels)
    assert res.ids[:, 0].tolist() == list(range(7))
    # a query reproduces its stored row exactly only under the row's own label
    emb = idx.embed(images, labels=labels)
    assert rel_err(emb["tracin"], idx.vectors("tracin")).max() <= 1e-4
    wrong = idx.embed(images, labels=(labels + 1) % NUM_CLASSES)["tracin"]
    assert rel_err(wrong, idx.vectors("tracin")).min() > 1e-2
    one = idx.embed(images[:2], labels=1)["tracin"]  # one label for every image
    assert rel_err(one, idx.embed(images[:2], labels=[1, 1])["tracin"]).max() <= 1e-5
    per_label = idx.query_each_label(images[:2], k=2)  # every class, scored separately
    assert sorted(per_label) == [0, 1, 2]
    for c, res in per_label.items():
        np.testing.assert_array_equal(res.ids, idx.query(images[:2], k=2, labels=c).ids)
    assert per_label[0].ids[0, 0] == 0 and per_label[1].ids[1, 0] == 1  # own label: itself
    with pytest.raises(gi.DataError, match="class-conditional: pass labels"):
        idx.query(images[:1])
    with pytest.raises(gi.DataError, match="3 classes"):
        idx.query(images[:1], labels=[3])
    with pytest.raises(gi.DataError, match="one per image"):
        idx.query(images[:2], labels=[0, 1, 2])


def test_class_subfolders(tmp_path, images):
    folder = tmp_path / "train"
    names = ["cat", "dog", "eel"]
    for i, im in enumerate(images[:6]):
        (folder / names[i % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((im[0] * 255).astype(np.uint8)).save(folder / names[i % 3] / f"{i}.png")
    spec = gi.BuildSpec(proj_dim=64, timesteps=2)
    idx = gi.build_index(
        checkpoints=[(class_unet(4), scheduler())],
        data=str(folder),
        out=tmp_path / "i",
        spec=spec,
        progress=False,
    )
    assert idx.conditioning["class_names"] == names
    assert idx._get_embedder().featurizers[0].backend == "hooks"  # auto: Embedding has a rule
    with h5py.File(tmp_path / "i" / "vectors.h5", "r") as f:
        stored = dict(zip(f["ids"].asstr()[()], f["labels"][()]))
    assert stored == {f"{names[i % 3]}/{i}.png": i % 3 for i in range(6)}
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["conditioning"]["class_names"] == names
    # queries by class name give the rows of queries by number
    x = load_images(str(folder / "dog"))[0]
    by_name = idx.embed(x, labels="dog")["retrac"]
    assert rel_err(by_name, idx.embed(x, labels=1)["retrac"]).max() <= 1e-5
    assert idx.search(by_name, k=1).ids[:, 0].tolist() == ["dog/1.png", "dog/4.png"]
    with pytest.raises(gi.DataError, match="not a class of this index"):
        idx.embed(x, labels="fox")


def test_bad_labels(tmp_path, images):
    sched = scheduler()
    build = functools.partial(
        gi.build_index, spec=gi.BuildSpec(proj_dim=64, timesteps=2), progress=False
    )
    with pytest.raises(gi.DataError, match="no labels were found"):
        build(checkpoints=[(class_unet(0), sched)], data=images, out=tmp_path / "a")
    with pytest.raises(gi.DataError, match="3 classes"):
        build(checkpoints=[(class_unet(0), sched)], data=images, labels=[5] * 7, out=tmp_path / "b")
    with pytest.raises(gi.DataError, match="one per image"):
        build(checkpoints=[(class_unet(0), sched)], data=images, labels=[0, 1], out=tmp_path / "c")
    with pytest.raises(gi.DataError, match="must be integers"):
        build(
            checkpoints=[(class_unet(0), sched)], data=images, labels=[0.5] * 7, out=tmp_path / "d"
        )
    from tests.conftest import tiny_unet

    with pytest.raises(gi.DataError, match="unconditional"):
        build(checkpoints=[(tiny_unet(0), sched)], data=images, labels=[0] * 7, out=tmp_path / "e")
    for name in "abcde":  # nothing that looks like an index was left behind
        assert not (tmp_path / name / "manifest.json").exists()


def test_cli_labels(tmp_path, images):
    from click.testing import CliRunner

    from gradindex.cli.main import main

    folder = tmp_path / "run"
    class_unet(5).save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    np.save(tmp_path / "x.npy", images[:4])
    (tmp_path / "labels.txt").write_text("0\n2\n1\n2\n")
    out = tmp_path / "idx"
    common = ["--proj-dim", "64", "--timesteps", "2"]
    res = CliRunner().invoke(
        main,
        ["build", "-c", str(folder), "--data", str(tmp_path / "x.npy"), "--out", str(out)]
        + ["--labels", str(tmp_path / "labels.txt"), *common],
    )
    assert res.exit_code == 0, res.output
    for i, label in enumerate([0, 2, 1, 2]):
        np.save(tmp_path / "q.npy", images[i : i + 1])
        res = CliRunner().invoke(
            main,
            ["query", str(out), str(tmp_path / "q.npy"), "-k", "1", "--method", "retrac"]
            + ["--label", str(label), "--json"],
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["ids"] == [i]
    res = CliRunner().invoke(main, ["info", str(out)])
    assert "conditioning class  3 classes" in res.output
    res = CliRunner().invoke(main, ["query", str(out), str(tmp_path / "q.npy")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: this index is class-conditional")


def test_embedding_hook_rule_matches_loop():
    """The hook rule for Embedding weights (several positions, repeats, a padding index)
    against one torch.autograd.grad per item."""
    from torch import nn

    from gradindex.featurize.persample import HookGradients

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3, padding_idx=0)
            self.lin = nn.Linear(3, 2)

        def forward(self, x, t, tokens):
            h = self.lin(torch.tanh(self.emb(tokens)).sum(1))  # [I, 2]
            return x * h.sum(1)[:, None, None, None]

    torch.manual_seed(0)
    model = Tokens()
    tokens = torch.tensor([[1, 1, 0, 5], [0, 0, 0, 0], [2, 3, 4, 2]])
    x, t = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    target = torch.randn(3, 1, 2, 2)
    names = ["emb.weight", "lin.weight"]
    loss = lambda out, tgt: (out - tgt).pow(2).flatten(1).mean(1)  # noqa: E731
    got = HookGradients(model, names, loss).item_gradients(x, t, target, cond={"tokens": tokens})
    params = [model.emb.weight, model.lin.weight]
    for i in range(3):
        value = loss(model(x[i : i + 1], t[i : i + 1], tokens[i : i + 1]), target[i : i + 1])
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value.sum(), params)])
        torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-7)
    assert got[1, :18].abs().max() == 0  # item 1 only looks up the padding row


def _saved_class_run(folder, seed: int) -> str:
    """A class-conditional checkpoint folder (unet/, scheduler/), which the CLI can reopen."""
    class_unet(seed).save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    return str(folder)


def _count_loads(monkeypatch, path) -> list:
    """Every np.load of ``path`` from here on (what reading a data source costs)."""
    calls, real = [], np.load

    def load(file, *args, **kwargs):
        if str(file) == str(path):
            calls.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", load)
    return calls


def test_an_npz_is_read_once_for_images_and_labels(tmp_path, images, monkeypatch):
    """Build and query each open the data file once for its images and labels (they opened it
    twice: once for the images, again for the labels)."""
    from click.testing import CliRunner

    from gradindex.cli.main import main
    from gradindex.inputs.query_images import read_inputs

    path = tmp_path / "train.npz"
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    np.savez(path, images=images, labels=labels)
    calls = _count_loads(monkeypatch, path)
    got = read_inputs(str(path), 1, "class")
    assert len(calls) == 1
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.cond.labels, labels)
    np.testing.assert_array_equal(got.ids, np.arange(7))
    calls.clear()
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=4)
    build = functools.partial(gi.build_index, spec=spec, progress=False, fidelity_sample=0)
    idx = build(
        checkpoints=[_saved_class_run(tmp_path / "run", 3)], data=str(path), out=tmp_path / "i"
    )
    assert len(calls) == 1
    with h5py.File(tmp_path / "i" / "vectors.h5", "r") as f:
        np.testing.assert_array_equal(f["labels"][()], labels)
    calls.clear()
    res = CliRunner().invoke(main, ["query", str(idx.path), str(path), "-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    records = [json.loads(line) for line in res.output.splitlines()]
    assert [r["ids"][0] for r in records if r["method"] == "retrac"] == list(range(7))


def test_labels_given_win_and_the_files_are_not_read(tmp_path, images, monkeypatch):
    """Given labels are used as given: a broken labels array in the file is never opened."""
    from gradindex.inputs.query_images import query_inputs, read_inputs

    path = tmp_path / "q.npz"
    np.savez(path, images=images[:2], labels=np.array(["x", "y"], dtype=object))
    got = read_inputs(str(path), 1, "class", labels=[1, 2])
    np.testing.assert_array_equal(got.cond.labels, [1, 2])
    arr, names, cond = query_inputs(str(path), 1, "class", labels="dog")
    np.testing.assert_array_equal(arr, images[:2])
    assert names.tolist() == [0, 1] and cond == {"labels": "dog", "prompts": None}
    with pytest.raises(gi.DataError, match="Python objects"):  # read when none is given
        read_inputs(str(path), 1, "class")


def test_query_folder_of_some_classes_takes_the_index_numbers(tmp_path, images):
    """A query folder holding only some of the index's class sub-folders numbers them 0, 1 on
    its own; its labels reach the index as names, so 'eel' is the index's class 2, not 1."""
    from click.testing import CliRunner

    from gradindex.cli.main import main
    from gradindex.inputs.query_images import query_inputs

    names = ["cat", "dog", "eel"]
    for root, keep in ((tmp_path / "train", names), (tmp_path / "q", ["dog", "eel"])):
        for i, im in enumerate(images[:6]):
            if names[i % 3] in keep:
                (root / names[i % 3]).mkdir(parents=True, exist_ok=True)
                Image.fromarray((im[0] * 255).astype(np.uint8)).save(
                    root / names[i % 3] / f"{i}.png"
                )
    spec = gi.BuildSpec(proj_dim=64, timesteps=2)
    idx = gi.build_index(
        checkpoints=[_saved_class_run(tmp_path / "run", 4)], data=str(tmp_path / "train"),
        out=tmp_path / "i", spec=spec, progress=False, fidelity_sample=0,
    )  # fmt: skip
    arr, qnames, cond = query_inputs(str(tmp_path / "q"), 1, "class")
    assert qnames.tolist() == ["dog/1.png", "dog/4.png", "eel/2.png", "eel/5.png"]
    assert cond == {"labels": ["dog", "dog", "eel", "eel"], "prompts": None}
    by_number = idx.embed(arr, labels=[1, 1, 2, 2])["retrac"]
    assert rel_err(idx.embed(arr, **cond)["retrac"], by_number).max() <= 1e-5
    res = CliRunner().invoke(
        main,
        ["query", str(idx.path), str(tmp_path / "q"), "-k", "1"] + ["--method", "retrac", "--json"],
    )
    assert res.exit_code == 0, res.output
    assert [json.loads(line)["ids"][0] for line in res.output.splitlines()] == qnames.tolist()


def test_label_and_prompt_files(tmp_path):
    from gradindex.inputs.query_images import read_labels_file, read_prompts_file

    (tmp_path / "l.txt").write_text("0\n\n -1 \ndog\n 2\n")
    assert read_labels_file(tmp_path / "l.txt") == [0, -1, "dog", 2]
    np.save(tmp_path / "l.npy", np.array([3, 1]))
    np.testing.assert_array_equal(read_labels_file(str(tmp_path / "l.npy")), [3, 1])
    (tmp_path / "p.txt").write_text("a red  fox\n\n  two cats \n")
    assert read_prompts_file(tmp_path / "p.txt") == ["a red  fox", "  two cats "]
