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
from gradindex.inputs.data import load_images
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

    from gradindex.cli import main

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
