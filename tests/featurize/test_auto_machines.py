"""'auto' across machines and users' choices: an explicit norms choice kept, a build resumed or
shards merged where 'auto' decides the precision otherwise (no bfloat16 units), the choice and
its reason shown by info, nonsense combinations refused in one line. 'Another machine' is
simulated by patching the bfloat16-unit check and the large-model line of featurize.auto."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradindex as gi
import gradindex.featurize.auto as auto
import gradindex.featurize.embedding as embedding
from gradindex.featurize.auto import resolve_auto
from gradindex.featurize.budget import FULL_PATH_BYTES, full_path_bytes
from gradindex.store.describe import format_info
from gradindex.store.layout import MANIFEST
from gradindex.store.vectors import VectorStore
from tests.conftest import assert_rows_close, error_line, run, scheduler, tiny_unet
from tests.featurize.test_auto import _draw_gradients

SPEC = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=3)


def _machine(monkeypatch, large: bool, bf16: bool) -> None:
    """This process as a machine where 'auto' finds the model large (or not) and bfloat16
    units (or none)."""
    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 0 if large else FULL_PATH_BYTES)
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: bf16)
    monkeypatch.setattr(embedding, "native_bfloat16", lambda device: bf16)


def test_an_explicit_norms_choice_is_kept_when_auto_picks_the_projection(monkeypatch):
    """norms='exact' beside projection='auto' on a large model: kronecker-sjlt with exact norms
    (it was silently made 'projected'); norms='projected' there: kronecker-sjlt (it was refused
    though auto picks a Kronecker projection); on a small model: refused, saying why."""
    model = tiny_unet(0)
    names = [n for n, _ in model.named_parameters()]
    _machine(monkeypatch, large=True, bf16=False)
    exact = resolve_auto(gi.BuildSpec(norms="exact"), model, names, "cpu")
    assert (exact.projection, exact.norms) == ("kronecker-sjlt", "exact")
    projected = resolve_auto(gi.BuildSpec(norms="projected"), model, names, "cpu")
    assert (projected.projection, projected.norms) == ("kronecker-sjlt", "projected")
    _machine(monkeypatch, large=False, bf16=False)
    with pytest.raises(gi.SpecError, match=r"picks sjlt for this model \(.*within the 1 GiB"):
        resolve_auto(gi.BuildSpec(norms="projected"), model, names, "cpu")


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_auto_decides_the_same_at_any_batch_size(monkeypatch, batch_size):
    """The batch size is not part of an index's identity (a shard rebuilt with a smaller one
    after running out of memory is the same index), so 'auto' must not decide by it: with the
    line between a batch of 4's and a batch of 16's buffers, every batch size gets the choice
    the default batch gets (it was sjlt at batch 1 and 4, kronecker-sjlt at 16 and 64)."""
    model = tiny_unet(0)
    names = [n for n, _ in model.named_parameters()]
    p = sum(t.numel() for t in model.parameters())
    monkeypatch.setattr(auto, "FULL_PATH_BYTES", full_path_bytes(p, 8, 1))
    default = resolve_auto(gi.BuildSpec(), model, names, "cpu")
    assert default.projection == "kronecker-sjlt"
    other = resolve_auto(gi.BuildSpec(batch_size=batch_size), model, names, "cpu")
    assert other.fingerprint() == default.fingerprint()


def test_a_large_model_built_with_exact_norms_stores_the_full_space_norms(
    monkeypatch, tmp_path, images
):
    """--norms exact with the default projection on a large model: the stored norms are each
    draw's full-space gradient norm from plain autograd (not the projections' norms)."""
    _machine(monkeypatch, large=True, bf16=False)
    model, sched = tiny_unet(3), scheduler()
    idx = gi.build_index(
        checkpoints=[(model, sched)],
        data=images[:3],
        out=tmp_path / "i",
        spec=SPEC.replace(norms="exact"),
        progress=False,
        fidelity_sample=0,
    )
    assert (idx.spec.projection, idx.spec.norms) == ("kronecker-sjlt", "exact")
    x0 = torch.from_numpy(images[:3]) * 2 - 1
    grads = _draw_gradients(model, sched, x0, idx.spec)  # per draw: name -> [N, *shape]
    want = torch.stack(
        [torch.cat([g.flatten(1) for g in draw.values()], 1).norm(dim=1) for draw in grads], 1
    )  # [N, K·M]
    np.testing.assert_allclose(idx.norms[:, 0], want.numpy(), rtol=1e-4)


def test_a_build_resumed_on_a_machine_without_bfloat16_units_finishes_in_bfloat16(
    monkeypatch, tmp_path, images
):
    """A default build of a large model stopped after its first batch on a machine with
    bfloat16 units, resumed on one without: 'auto' keeps the build's own decisions (it refused
    the resume as 'different settings'), and the rows equal an uninterrupted build's."""
    pair = (tiny_unet(5), scheduler())
    kw = dict(checkpoints=[pair], data=images, spec=SPEC, progress=False, fidelity_sample=0)
    _machine(monkeypatch, large=True, bf16=True)
    whole = gi.build_index(out=tmp_path / "whole", **kw)
    assert whole.spec.precision == "bfloat16"
    original = VectorStore.write_rows

    def stop_after_first(self, start, *a):
        if start > 0:
            raise KeyboardInterrupt
        original(self, start, *a)

    monkeypatch.setattr(VectorStore, "write_rows", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        gi.build_index(out=tmp_path / "r", **kw)
    monkeypatch.setattr(VectorStore, "write_rows", original)
    _machine(monkeypatch, large=True, bf16=False)
    done = gi.build_index(out=tmp_path / "r", resume=True, **kw)
    assert (done.spec.projection, done.spec.precision) == ("kronecker-sjlt", "bfloat16")
    assert done.info()["auto"]["kept"] == ["precision"]
    for method in ("tracin", "retrac"):
        assert_rows_close(done.vectors(method), whole.vectors(method))
    # another projection asked: the build's settings differ (its decided norms and precision
    # are not forced onto sjlt, which refused them as a bad spec)
    with pytest.raises(gi.IndexStateError, match=r"different settings \(.*spec\.projection"):
        gi.build_index(
            out=tmp_path / "r", resume=True, **{**kw, "spec": SPEC.replace(projection="sjlt")}
        )


def test_a_bfloat16_index_queried_without_bfloat16_units_warns_and_gives_its_rows(
    monkeypatch, tmp_path, images, caplog
):
    """A default large-model index built where there are bfloat16 units, queried where there
    are none: the query computes in bfloat16 as the index did (emulated: the same rows) and
    says it will be slower (it said nothing)."""
    pair = (tiny_unet(6), scheduler())
    _machine(monkeypatch, large=True, bf16=True)
    idx = gi.build_index(
        checkpoints=[pair], data=images[:4], out=tmp_path / "i", spec=SPEC, progress=False,
        fidelity_sample=0,
    )  # fmt: skip
    assert idx.spec.precision == "bfloat16"
    _machine(monkeypatch, large=False, bf16=False)
    with caplog.at_level("WARNING", logger="gradindex.featurize.embedding"):
        emb = gi.AttributionIndex.open(tmp_path / "i", checkpoints=[pair]).embed(images[:4])
    assert "bfloat16 on cpu, which has no bfloat16 units: emulated" in caplog.text
    for method in ("tracin", "retrac"):
        assert_rows_close(emb[method], idx.vectors(method))


def _cli_build(checkpoints, data, out, *extra):
    args = [a for c in checkpoints for a in ("-c", c)]
    return run(
        "build", *args, "--data", data, "--out", out, "--proj-dim", 64, "--timesteps", 2,
        "--batch-size", 2, "--fidelity-sample", 0, *extra,
    )  # fmt: skip


def test_merging_shards_auto_decided_otherwise_says_which_value_to_pin(
    monkeypatch, tmp_path, saved_checkpoints, images
):
    """Shard 0 built where there are bfloat16 units, shard 1 where there are none: merge
    names the field, both values and the option that fixes it; shard 1 rebuilt with it merges
    into the rows of one build of all the data."""
    data = tmp_path / "train.npy"
    np.save(data, images[:6])
    _machine(monkeypatch, large=True, bf16=True)
    assert _cli_build(saved_checkpoints, data, tmp_path / "s0", "--shard", "0/2").exit_code == 0
    whole = _cli_build(saved_checkpoints, data, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    _machine(monkeypatch, large=True, bf16=False)
    assert _cli_build(saved_checkpoints, data, tmp_path / "s1", "--shard", "1/2").exit_code == 0
    res = run("merge", tmp_path / "m", tmp_path / "s0", tmp_path / "s1")
    line = error_line(res)
    assert "spec.precision 'float32' vs 'bfloat16'" in line, line
    assert "rebuild " + str(tmp_path / "s1") + " with --precision bfloat16" in line, line
    assert not (tmp_path / "m").exists()
    pinned = ("--shard", "1/2", "--precision", "bfloat16", "--overwrite")
    assert _cli_build(saved_checkpoints, data, tmp_path / "s1", *pinned).exit_code == 0
    res = run("merge", tmp_path / "m", tmp_path / "s0", tmp_path / "s1")
    assert res.exit_code == 0, res.output
    merged, one = (
        gi.AttributionIndex.open(tmp_path / "m"),
        gi.AttributionIndex.open(tmp_path / "whole"),
    )
    for method in ("tracin", "retrac"):
        assert_rows_close(merged.vectors(method), one.vectors(method))


def test_info_of_a_kronecker_index_says_what_auto_chose_and_why_in_a_few_lines(
    monkeypatch, tmp_path, saved_checkpoints, images
):
    """info: one 'auto' line with the decision and its reason, the layers summed up in two
    lines (it listed every parameter tensor); --layers lists each one."""
    data = tmp_path / "train.npy"
    np.save(data, images[:2])
    _machine(monkeypatch, large=True, bf16=False)
    assert _cli_build(saved_checkpoints[:1], data, tmp_path / "i").exit_code == 0
    out = run("info", tmp_path / "i").output.splitlines()
    auto_line = [ln for ln in out if ln.startswith("auto ")]
    assert len(auto_line) == 1, out
    assert "projection kronecker-sjlt, precision float32, norms projected" in auto_line[0]
    assert "over the 0 GiB line; cpu has no bfloat16 units" in auto_line[0]
    num_tensors = len(list(tiny_unet(0).parameters()))
    layers = [ln for ln in out if ln.startswith("layer")]
    assert len(layers) == 2 and f"of {num_tensors} parameter tensors" in layers[1], layers
    assert len(out) < 30, out
    every = [ln for ln in run("info", tmp_path / "i", "--layers").output.splitlines()]
    assert sum(ln.startswith("layer ") for ln in every) == num_tensors
    # 113 factored layers (the 35.7M DDPM's count) in 20 shapes: four named, the rest counted
    info = gi.AttributionIndex.open(tmp_path / "i").info()
    shapes = [f"kronecker {i}x{2 * i}, projected norm" for i in range(1, 21)]
    info["layers"] = {f"l{j}": shapes[j % 20] for j in range(113)} | {"b": "dense", "c": "dense"}
    summary = [ln for ln in format_info(info) if ln.startswith("layers")]
    assert summary[0].endswith(
        "113 factored P_out x P_in: 6 at 1x2, 6 at 2x4, 6 at 3x6, 6 at 4x8, 89 in 16 other shapes "
        "(norms: 113 projected norm)"
    ), summary
    assert "2 of 115 parameter tensors kept whole" in summary[1]
    # no advice that would fail: 'gradindex factors' refuses a Kronecker index
    factors = [ln for ln in out if ln.startswith("factors")]
    assert factors == [
        "factors      none: --method influence needs a full-space query gradient, which a "
        "kronecker-sjlt index never forms (build with --projection sjlt for it)"
    ]
    assert "full-space query gradient" in error_line(run("factors", tmp_path / "i", "--data", data))
    info["spec"] = {**info["spec"], "projection": "sjlt", "precondition": "adam"}
    assert "factors      none: --method influence needs plain gradients, not 'adam' ones" in (
        format_info(info)
    )
    manifest = json.loads((tmp_path / "i" / MANIFEST).read_text())
    assert manifest["auto"]["decided"] == {
        "projection": "kronecker-sjlt",
        "precision": "float32",
        "norms": "projected",
    }


def test_nonsense_combinations_are_one_line_errors(tmp_path, saved_checkpoints, images):
    """A kronecker-sjlt d above the layer outputs it maps from (the final map would only
    widen the rows), projected norms with sjlt: one line saying what to do, nothing written."""
    data = tmp_path / "train.npy"
    np.save(data, images[:2])
    res = _cli_build(
        saved_checkpoints[:1], data, tmp_path / "a", "--projection", "kronecker-sjlt",
        "--proj-dim", 65536,
    )  # fmt: skip
    assert "lower it or use projection='sjlt'" in error_line(res)
    assert not (tmp_path / "a").exists()
    res = _cli_build(
        saved_checkpoints[:1], data, tmp_path / "b", "--projection", "sjlt", "--norms", "projected"
    )
    assert error_line(res).endswith("or norms='exact'")
    help_text = run("build", "--help").output
    assert "--norms [auto|exact|projected]" in help_text


def test_kronecker_sjlt_on_a_batchnorm_model_is_refused_by_its_own_name():
    """The message names the projection asked for (it said 'kronecker' for 'kronecker-sjlt')."""
    from gradindex.featurize.kronecker import KroneckerFeaturizer
    from tests.featurize.test_persample import BNDenoiser, checkpoint

    spec = gi.BuildSpec(projection="kronecker-sjlt", proj_dim=16, timesteps=2)
    with pytest.raises(gi.ModelError, match=r"^projection='kronecker-sjlt' needs a batch-indep"):
        KroneckerFeaturizer(checkpoint(BNDenoiser().eval()), spec, seed=0)


def test_build_help_states_the_line_auto_draws():
    """--projection's help gives the parameter count where 'auto' switches, which is the
    code's line (at one noise draw), and names the choices of --norms and --precision."""
    help_text = " ".join(run("build", "--help").output.split())
    line = FULL_PATH_BYTES / full_path_bytes(1, auto.LINE_BATCH, 1)  # parameters
    assert f"up to {line / 1e6:.1f}M parameters at one noise draw" in help_text
    spec = gi.BuildSpec()
    assert not auto.large_model(spec, int(line)) and auto.large_model(spec, int(line) + 1)
    assert "--norms [auto|exact|projected]" in help_text
    assert "--precision [auto|float32|bfloat16]" in help_text
