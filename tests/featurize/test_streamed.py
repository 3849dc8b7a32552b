"""The streamed featurize path (per-layer per-item gradients projected inside the hooks) against
a plain per-sample autograd loop, the automatic path choice recorded and repeated at query time,
and the memory budget (``--max-memory``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradindex as gi
import gradindex.featurize.budget as budget
from gradindex.cli.main import main
from gradindex.errors import MemoryBudgetError, SpecError
from gradindex.featurize.budget import parse_memory
from gradindex.featurize.embedding import Embedder, projection_seed
from gradindex.featurize.projection import make_projector
from gradindex.inputs.models import load_checkpoints
from gradindex.store.layout import MANIFEST
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows

WEIGHTS = (1.0, 3.0)


def _checkpoints(**unet):
    return load_checkpoints(
        [(tiny_unet(s, **unet), scheduler()) for s in (1, 2)], None, None, "none"
    )


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("conditional", [False, True])
def test_streamed_rows_equal_the_projected_rows_of_a_per_sample_loop(conditional):
    """5 samples in batches of 3, K = 3 timesteps × M = 2 noise draws, two weighted
    checkpoints, d = 60: TracIn / ReTrac rows are the checkpoint's sjlt map applied to the
    loop's full-space vectors, norms the loop's, to 1e-4 relative."""
    unet = {"num_class_embeds": 3} if conditional else {}
    ckpts = _checkpoints(**unet)
    spec = gi.BuildSpec(
        proj_dim=60, timesteps=3, noise_draws=2, batch_size=3, checkpoint_weights=WEIGHTS,
        num_train_timesteps=1000, seed=4,
    )  # fmt: skip
    emb = Embedder(ckpts, spec, path="streamed")
    assert emb.path == "streamed" and all(f.backend == "streamed" for f in emb.featurizers)
    x0 = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([0, 2, 1, 1, 0])
    rows = [
        emb.embed(x0[i : i + 3], {"class_labels": labels[i : i + 3]} if conditional else None)
        for i in (0, 3)
    ]
    conds = [{"class_labels": labels[i : i + 1]} if conditional else {} for i in range(5)]
    models = [c.model for c in ckpts]
    T, U, N = reference_rows(models, scheduler(), x0, conds, spec, WEIGHTS)  # full space
    p = T.shape[1] // 2
    want_t, want_r = [], []
    for c, w in enumerate(WEIGHTS):
        proj = make_projector("sjlt", p, 60, projection_seed(spec.proj_seed, c), nnz=4)
        a = proj.project(torch.from_numpy(T[:, c * p : (c + 1) * p]).float()).double().numpy()
        r = proj.project(torch.from_numpy(U[:, c * p : (c + 1) * p]).float()).double().numpy()
        want_t.append(a)  # T's blocks carry √w_c already
        want_r.append(np.sqrt(w) * r / np.linalg.norm(r, axis=1, keepdims=True))
    got = {m: np.concatenate([getattr(e, m) for e in rows]) for m in ("tracin", "retrac", "norms")}
    assert _relative(got["tracin"], np.concatenate(want_t, 1)) < 1e-4
    assert _relative(got["retrac"], np.concatenate(want_r, 1)) < 1e-4
    assert _relative(got["norms"], N) < 1e-4


def test_a_budget_that_splits_a_batch_gives_the_same_rows():
    """A budget too small for one batch's items per call splits the batch by samples: rows
    unchanged, on both paths."""
    ckpts = _checkpoints()
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, noise_draws=2, batch_size=7,
                        num_train_timesteps=1000)  # fmt: skip
    x0 = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for path in ("full", "streamed"):
        free = Embedder(ckpts, spec, path=path).embed(x0)
        tight = Embedder(ckpts, spec, path=path)
        for f in tight.featurizers:  # room for the activations of 4 items (2 samples' draws)
            f.memory_left = 4 * (f.row_dim * 4 + 2 * _activation(f))
        got = tight.embed(x0)
        assert tight.featurizers[0]._fitted_items == 4
        for m in ("tracin", "retrac", "norms"):
            np.testing.assert_allclose(getattr(got, m), getattr(free, m), rtol=1e-5, atol=1e-6)


def test_the_automatic_budget_adds_to_what_the_process_already_holds(monkeypatch):
    """The available memory excludes what this process holds: a query in a process holding
    12 GiB (a large index open beside the model) with 9 GiB still available gets the usual
    AUTO_WORK_BYTES of per-item work and embeds (it was refused as 'cannot hold one sample':
    70% of the available memory was compared with the whole resident size); with little
    available, the work is bounded by 70% of it."""
    ckpts = _checkpoints()
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, noise_draws=2, batch_size=3,
                        num_train_timesteps=1000)  # fmt: skip
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    monkeypatch.setattr("gradindex.featurize.embedding.resident_bytes", lambda: 12 << 30)
    for avail, work in ((9 << 30, budget.AUTO_WORK_BYTES), (200 << 20, int(0.7 * (200 << 20)))):
        monkeypatch.setattr(budget, "available_memory", lambda a=avail: a)
        emb = Embedder(ckpts, spec, path="full")
        buffers = 8 * emb.featurizers[0].num_params * spec.batch_size
        assert [f.memory_left for f in emb.featurizers] == [work - buffers] * len(ckpts)
    monkeypatch.setattr(budget, "available_memory", lambda: 9 << 30)
    assert Embedder(ckpts, spec).embed(x0).tracin.shape[0] == 3


def _activation(feat) -> int:
    x = torch.zeros(1, 1, 8, 8)
    return budget.activation_bytes(feat.model, lambda: feat.model(x, torch.tensor([1])))


def _build(tmp_path, name="idx", **kwargs):
    imgs = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    return gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())],
        data=imgs,
        out=tmp_path / name,
        spec=gi.BuildSpec(proj_dim=32, timesteps=2, batch_size=4),
        progress=False,
        fidelity_sample=0,
        **kwargs,
    ), imgs


def test_the_automatic_path_is_recorded_and_a_query_repeats_it(tmp_path, monkeypatch):
    """Above FULL_PATH_BYTES of full-path buffers a build streams and says so in the manifest;
    reopened where 'auto' would choose the full path, the query still streams (the recorded
    path wins) and reproduces the stored rows."""
    monkeypatch.setattr(budget, "FULL_PATH_BYTES", 0)
    idx, imgs = _build(tmp_path)
    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    assert manifest["featurize"] == {"path": "streamed", "max_memory": None}
    assert idx.info()["featurize"]["path"] == "streamed"
    monkeypatch.setattr(budget, "FULL_PATH_BYTES", 1 << 40)
    small, _ = _build(tmp_path, "small")
    assert small.manifest["featurize"]["path"] == "full"

    again = gi.AttributionIndex.open(tmp_path / "idx", checkpoints=[(tiny_unet(1), scheduler())])
    emb = again.embed(imgs[:3])
    assert again._get_embedder().path == "streamed"
    np.testing.assert_allclose(emb["tracin"], idx.vectors("tracin")[:3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(emb["retrac"], idx.vectors("retrac")[:3], rtol=1e-5, atol=1e-7)
    # the two paths agree up to float32 summation order (why a query repeats the recorded one)
    np.testing.assert_allclose(idx.vectors("tracin"), small.vectors("tracin"), rtol=1e-4, atol=1e-5)


def test_a_budget_without_room_for_one_sample_is_one_line_and_writes_nothing(
    tmp_path, saved_checkpoints
):
    with pytest.raises(MemoryBudgetError, match=r"cannot hold one sample.*--max-memory"):
        _build(tmp_path, max_memory="1M")
    assert not (tmp_path / "idx" / MANIFEST).exists()  # no index, nothing half-written kept
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32))
    ckpt = [a for c in saved_checkpoints for a in ("-c", str(c))]
    args = ["build", *ckpt, "--data", str(data), "--out", str(tmp_path / "o"), "--proj-dim", "32"]
    res = CliRunner().invoke(main, [*args, "--max-memory", "1M"])
    errors = [line for line in res.output.splitlines() if "Error" in line]  # after a progress bar
    assert res.exit_code == 1 and len(errors) == 1, res.output
    assert errors[0].startswith("Error: max_memory=1M cannot hold one sample")
    assert "Traceback" not in res.output
    assert not (tmp_path / "o" / MANIFEST).exists()
    res = CliRunner().invoke(main, [*args, "--max-memory", "lots"])
    assert res.exit_code == 1 and "give a size such as 8G" in res.output
    res = CliRunner().invoke(main, [*args, "--max-memory", "4G", "--resume"])  # the same build
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    ("text", "want"),
    [("8G", 8 << 30), ("512M", 512 << 20), ("2.5GB", int(2.5 * 2**30)), ("1000", 1000),
     ("64KiB", 64 << 10), (None, None), (4096, 4096)],
)  # fmt: skip
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("bad", ["", "G", "-1G", "0", "eight", "inf", "nan", "1e30T", 0, -5, True])
def test_parse_memory_refuses(bad):
    with pytest.raises(SpecError, match="max_memory"):
        parse_memory(bad)


def test_streamed_path_refuses_what_it_cannot_compute():
    ckpts = _checkpoints()
    spec = gi.BuildSpec(proj_dim=64, projection="gaussian", timesteps=1, num_train_timesteps=1000)
    with pytest.raises(SpecError, match="'streamed' needs projection='sjlt'"):
        Embedder(ckpts, spec, path="streamed")
    with pytest.raises(SpecError, match="featurize path 'fast'"):
        Embedder(ckpts, spec.replace(projection="sjlt"), path="fast")
    assert Embedder(ckpts, spec, path="auto").path == "full"  # auto: only what it can do


@pytest.mark.parametrize(
    ("projection", "reference"),
    [("kronecker", "sketch"), ("sjlt", "sketch"), ("sjlt", "exact")],
)
def test_the_fidelity_check_keeps_the_builds_items_per_call(
    tmp_path, monkeypatch, projection, reference
):
    """The fidelity check featurizes its sample again (a second Kronecker / streamed sketch, or
    full-space gradients) with the items per call the memory budget gave the build: at 35.7M
    parameters 160 items per call would hold ~10 GB of activations. Here the budget allows 2."""
    import gradindex.featurize.fidelity as fidelity
    import gradindex.featurize.gradients as gradients

    monkeypatch.setattr(budget, "FULL_PATH_BYTES", 0)  # sjlt builds stream
    if reference == "sketch":
        monkeypatch.setattr(fidelity, "FULL_SPACE_BUDGET", 0)
    monkeypatch.setattr(gradients, "items_per_call", lambda *args: 2)
    calls: list[int] = []
    featurize = gradients.GradientFeaturizer._featurize

    def record(self, x0, draws, cond, reuse, items):
        calls.append(items)
        return featurize(self, x0, draws, cond, reuse, items)

    monkeypatch.setattr(gradients.GradientFeaturizer, "_featurize", record)
    n = 40 if reference == "sketch" else 8  # a sample <= 10%: a second sketch, not the halves
    imgs = np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)
    idx = gi.build_index(
        checkpoints=[(tiny_unet(1), scheduler())],
        data=imgs,
        out=tmp_path / "idx",
        spec=gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=4, projection=projection),
        progress=False,
        fidelity_sample=4,
    )
    record_ = idx.manifest["fidelity"]
    assert record_["reference"] == ("exact" if reference == "exact" else "second sketch (estimate)")
    assert len(calls) > n // 4 and max(calls) == 2, calls


def test_the_path_choice_by_hand():
    """'auto' streams past the full path's buffers, 4 bytes × p × (B·M + 2·B), against the
    smaller of FULL_PATH_BYTES and half the budget; at the line it stays full; a model the hooks
    cannot stream stays full."""
    p = 1 << 22  # batch 16, M = 2: 64 floats per parameter, 2^30 bytes at p = 2^22
    assert budget.full_path_bytes(p, 16, 2) == 1 << 30
    assert budget.choose_path("auto", True, p, 16, 2, 8 << 30) == "full"
    assert budget.choose_path("auto", True, p + 1, 16, 2, 8 << 30) == "streamed"
    assert budget.choose_path("auto", False, p + 1, 16, 2, 8 << 30) == "full"
    # a budget of 1 MiB: the buffers of 4,096 parameters (1 MiB) pass half of it
    assert budget.choose_path("auto", True, 4096, 16, 2, 1 << 20) == "streamed"
    assert budget.choose_path("auto", True, 2048, 16, 2, 1 << 20) == "full"


def test_items_per_call_holds_whole_samples_by_hand():
    """1,000 bytes at 100 per item hold 10 items: 9 as three samples of 3 noise draws (a
    sample's draws never split across calls), 10 as five of 2."""
    assert budget.items_per_call(1000, 100, 3, 4000) == 9
    assert budget.items_per_call(1000, 100, 2, 4000) == 10


def test_activation_bytes_counts_each_leaf_output_once():
    """Linear(4, 8) then ReLU on one item: two [1, 8] float32 outputs, 64 bytes (the
    Sequential's own output is the ReLU's, not counted again)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    assert budget.activation_bytes(model, lambda: model(torch.zeros(1, 4))) == 64
