"""BuildSpec(precondition="adam"): gradients scaled by 1/(sqrt(v̂)+eps) from each checkpoint's
Adam state (TrackStar), against an independent autograd loop and the optimizer's own state."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import gradindex as gi
from gradindex.cli.main import main
from gradindex.demo import training
from gradindex.demo.training import small_unet_config, train_ddpm
from gradindex.inputs.models import load_checkpoints
from gradindex.spec import OMITTED_AT_DEFAULT
from tests.conftest import assert_rows_close, scheduler, tiny_unet
from tests.diffusion_refs import reference_rows, rel_err

BETA2, EPS = 0.99, 1e-6  # not AdamW's defaults: the scale must read them from param_groups


def adam_run(root, images, seeds=(1, 2), steps=3):
    """Checkpoint folders ``root/checkpoint-<i>/{unet/, optimizer.bin}`` of tiny UNets after a
    few real AdamW steps, a ``root/scheduler/``; returns (folders, models, scales), the scales
    computed here from the live optimizer: 1/(sqrt(v / (1 - β2^step)) + eps) per parameter,
    flattened in named_parameters order."""
    sched = scheduler()
    sched.save_pretrained(root / "scheduler")
    x0 = torch.from_numpy(images) * 2 - 1
    folders, models, scales = [], [], []
    for i, seed in enumerate(seeds):
        model = tiny_unet(seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, BETA2), eps=EPS)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps + i):
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, 1000, (len(x0),), generator=gen)
            loss = F.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        folder = root / f"checkpoint-{i}"
        model.save_pretrained(folder / "unet")
        torch.save(opt.state_dict(), folder / "optimizer.bin")
        s = []
        for p in model.parameters():
            st = opt.state[p]
            v_hat = st["exp_avg_sq"].double() / (1 - BETA2 ** float(st["step"]))
            s.append((1 / (v_hat.sqrt() + EPS)).reshape(-1))
        folders.append(folder)
        models.append(model)
        scales.append(torch.cat(s))
    return folders, models, scales


@pytest.fixture
def run(tmp_path, images):
    return adam_run(tmp_path / "run", images[:5])


def test_identity_rows_match_autograd_loop_times_adam_scale(tmp_path, images, run, backend):
    folders, models, scales = run
    weights = (0.5, 2.0)
    spec = gi.BuildSpec(
        projection="identity", timesteps=3, noise_draws=2, seed=3, batch_size=3,
        checkpoint_weights=weights, precondition="adam",
    )  # fmt: skip
    idx = gi.build_index(
        checkpoints=folders, data=images[:5], out=tmp_path / "idx", spec=spec, progress=False
    )
    x0s = torch.from_numpy(images[:5]) * 2 - 1
    ref_t, ref_r, ref_n = reference_rows(
        models, scheduler(), x0s, [{}] * 5, idx.spec, weights, scales=scales
    )
    assert rel_err(idx.vectors("tracin"), ref_t).max() <= 1e-4
    assert rel_err(idx.vectors("retrac"), ref_r).max() <= 1e-4
    np.testing.assert_allclose(idx.norms, ref_n, rtol=1e-4)  # norms of s ⊙ g
    plain_t, _, _ = reference_rows(models, scheduler(), x0s, [{}] * 5, idx.spec, weights)
    assert rel_err(idx.vectors("tracin"), plain_t).min() > 0.1  # the scaling matters
    assert idx.info()["spec"]["precondition"] == "adam"


@pytest.mark.filterwarnings("ignore:projection fidelity is below the bar")
def test_query_embeds_with_the_same_scale(tmp_path, images, run):
    folders, _, _ = run
    spec = gi.BuildSpec(proj_dim=64, timesteps=4, precondition="adam", seed=1)
    out = tmp_path / "idx"
    idx = gi.build_index(checkpoints=folders, data=images[:5], out=out, spec=spec, progress=False)
    idx = gi.AttributionIndex.open(out)
    emb = idx.embed(images[:5])
    assert_rows_close(emb["tracin"], idx.vectors("tracin"))
    assert_rows_close(emb["retrac"], idx.vectors("retrac"))
    res = idx.query(images[:5], k=1, method="retrac")
    assert [list(r) for r in res.ids] == [[i] for i in idx.ids[:5]]
    plain = gi.build_index(
        checkpoints=folders, data=images[:5], out=tmp_path / "plain",
        spec=spec.replace(precondition="none"), progress=False,
    )  # fmt: skip
    assert rel_err(plain.vectors("tracin"), idx.vectors("tracin")).min() > 0.1
    # another optimizer state is refused at query time, like other weights
    state = torch.load(folders[1] / "optimizer.bin", weights_only=True)
    state["state"][0]["exp_avg_sq"] *= 2
    torch.save(state, folders[1] / "optimizer.bin")
    with pytest.raises(gi.ModelError, match=r"^checkpoint 1 .*optimizer state changed"):
        gi.AttributionIndex.open(out).embed(images[:1])


def test_in_memory_optimizer_state_gives_the_folder_rows(tmp_path, images, run):
    folders, models, _ = run
    spec = gi.BuildSpec(projection="identity", timesteps=2, precondition="adam")
    ref = gi.build_index(
        checkpoints=folders[:1], data=images[:3], out=tmp_path / "a", spec=spec, progress=False
    )
    state = torch.load(folders[0] / "optimizer.bin", weights_only=True)
    mem = gi.build_index(
        checkpoints=[(models[0], scheduler(), state)], data=images[:3], out=tmp_path / "b",
        spec=spec, progress=False,
    )  # fmt: skip
    assert_rows_close(mem.vectors("tracin"), ref.vectors("tracin"))
    with pytest.raises(gi.ModelError, match=r"^memory:0: precondition='adam' needs the optimizer"):
        gi.build_index(
            checkpoints=[(models[0], scheduler())], data=images[:3], out=tmp_path / "c",
            spec=spec, progress=False,
        )  # fmt: skip


def test_missing_or_mismatched_state_and_kronecker_are_one_line_errors(tmp_path, images, run):
    folders, _, _ = run
    spec = gi.BuildSpec(proj_dim=16, timesteps=2, precondition="adam")
    build = dict(data=images[:2], spec=spec, progress=False)
    (folders[1] / "optimizer.bin").unlink()
    with pytest.raises(gi.ModelError, match=r"no optimizer\.bin for precondition='adam'") as e:
        gi.build_index(checkpoints=folders, out=tmp_path / "a", **build)
    assert "\n" not in str(e.value)
    state = torch.load(folders[0] / "optimizer.bin", weights_only=True)
    state["state"][3]["exp_avg_sq"] = torch.ones(5)
    torch.save(state, folders[0] / "optimizer.bin")
    with pytest.raises(gi.ModelError, match=r"exp_avg_sq 3 has shape \(5,\) but parameter"):
        gi.build_index(checkpoints=folders[:1], out=tmp_path / "b", **build)
    state["state"][3] = {"step": state["state"][3]["step"]}  # an SGD-like state: no second moment
    torch.save(state, folders[0] / "optimizer.bin")
    with pytest.raises(gi.ModelError, match="has no exp_avg_sq / step: not an Adam"):
        gi.build_index(checkpoints=folders[:1], out=tmp_path / "c", **build)
    with pytest.raises(gi.SpecError, match=r"^BuildSpec.precondition='adam': .*not 'kronecker'"):
        gi.BuildSpec(projection="kronecker", precondition="adam")
    with pytest.raises(gi.SpecError, match="must be one of none, adam"):
        gi.BuildSpec(precondition="sgd")
    res = CliRunner().invoke(
        main,
        ["build", "-c", str(folders[1]), "--data", str(_npy(tmp_path, images)), "--out",
         str(tmp_path / "cli"), "--proj-dim", "16", "--timesteps", "2", "--precondition", "adam"],
    )  # fmt: skip
    assert res.exit_code != 0
    assert res.output.startswith("Error: ") and "no optimizer.bin" in res.output
    assert len(res.output.strip().splitlines()) == 1


def _npy(tmp_path, images):
    path = tmp_path / "data.npy"
    np.save(path, images[:2])
    return path


def test_default_keeps_the_spec_fingerprint_and_is_part_of_the_identity(tmp_path, images, run):
    spec = gi.BuildSpec(timesteps=2, proj_dim=16, projection="sjlt", precision="float32")
    old = dataclasses.asdict(spec)  # the fingerprint as computed before the field existed
    for key in (*OMITTED_AT_DEFAULT, "batch_size"):  # fields added since, and batch_size
        del old[key]
    old = {k: list(v) if isinstance(v, tuple) else v for k, v in old.items()}
    text = json.dumps(old, sort_keys=True, indent=2)
    assert spec.fingerprint() == hashlib.sha256(text.encode()).hexdigest()[:16]
    small = gi.BuildSpec(projection="sjlt", precision="float32")  # 'auto' on a small model
    assert small.fingerprint() == "fbc156a204638712"  # gradindex 0.x before the field
    assert "precondition" not in spec.to_dict() and "precondition" not in spec.to_json()
    assert gi.BuildSpec.from_dict(old).precondition == "none"
    adam = spec.replace(precondition="adam")
    assert adam.fingerprint() != spec.fingerprint()
    assert gi.BuildSpec.from_json(adam.to_json()) == adam
    assert adam.diff(spec) == {"precondition": ("adam", "none")}
    folders, _, _ = run
    out = tmp_path / "idx"
    gi.build_index(checkpoints=folders[:1], data=images[:2], out=out, spec=spec, progress=False)
    with pytest.raises(gi.IndexStateError, match="spec.precondition"):
        gi.build_index(
            checkpoints=folders[:1], data=images[:2], out=out, spec=adam, progress=False,
            resume=True,
        )  # fmt: skip


def test_train_ddpm_writes_the_optimizer_state_without_changing_training(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    cfg = small_unet_config(
        sample_size=8, channels=1, block_out_channels=(8, 16), norm_num_groups=4
    )
    args = dict(steps=6, batch_size=4, checkpoint_every=3, unet_config=cfg, progress=False)
    result = train_ddpm(x, tmp_path / "a", **args)
    for folder in result.checkpoints:
        state = torch.load(folder / "optimizer.bin", weights_only=True)
        unet = load_checkpoints([folder / "unet"], result.pipeline_dir)[0].model
        shapes = [tuple(p.shape) for p in unet.parameters()]
        assert [tuple(state["state"][i]["exp_avg_sq"].shape) for i in range(len(shapes))] == shapes
        assert int(state["state"][0]["step"]) == int(folder.name.split("-")[1])
    monkeypatch.setattr(training, "_save_optimizer", lambda opt, folder: None)
    bare = train_ddpm(x, tmp_path / "b", **args)
    assert not (bare.checkpoints[0] / "optimizer.bin").exists()
    for a, b in zip(result.unet_dirs, bare.unet_dirs, strict=True):
        wa, wb = (load_checkpoints([d], a.parents[1])[0].model.state_dict() for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the trainer's checkpoints (the unet/ folder given) precondition end to end
    last = [result.unet_dirs[-1]]
    ckpt = load_checkpoints(last, result.pipeline_dir, precondition="adam")[0]
    assert ckpt.scales is not None and len(ckpt.scales) == len(shapes)
    assert ckpt.fingerprint != load_checkpoints(last, result.pipeline_dir)[0].fingerprint


def test_streamed_path_scales_each_layer_before_its_norm_and_projection(tmp_path, images, run):
    """The streamed path (per-layer projection inside the hooks) applies s ⊙ g itself: its rows
    are the sjlt map of the loop's scaled full-space vectors, its norms those of s ⊙ g."""
    from gradindex.featurize.embedding import projection_seed
    from gradindex.featurize.projection import make_projector

    folders, models, scales = run
    weights = (0.5, 2.0)
    spec = gi.BuildSpec(
        proj_dim=60, timesteps=2, noise_draws=2, seed=3, batch_size=3,
        checkpoint_weights=weights, precondition="adam",
    )  # fmt: skip
    idx = gi.build_index(
        checkpoints=folders, data=images[:5], out=tmp_path / "idx", spec=spec, progress=False,
        featurize_path="streamed", fidelity_sample=0,
    )  # fmt: skip
    assert idx.manifest["featurize"]["path"] == "streamed"
    x0s = torch.from_numpy(images[:5]) * 2 - 1
    ref_t, ref_r, ref_n = reference_rows(
        models, scheduler(), x0s, [{}] * 5, idx.spec, weights, scales=scales
    )
    p = ref_t.shape[1] // 2
    want_t, want_r = [], []
    for c, w in enumerate(weights):
        proj = make_projector("sjlt", p, 60, projection_seed(spec.proj_seed, c), nnz=4)
        a = proj.project(torch.from_numpy(ref_t[:, c * p : (c + 1) * p]).float()).numpy()
        r = proj.project(torch.from_numpy(ref_r[:, c * p : (c + 1) * p]).float()).numpy()
        want_t.append(a)
        want_r.append(np.sqrt(w) * r / np.linalg.norm(r, axis=1, keepdims=True))
    assert rel_err(idx.vectors("tracin"), np.concatenate(want_t, 1)).max() <= 1e-4
    assert rel_err(idx.vectors("retrac"), np.concatenate(want_r, 1)).max() <= 1e-4
    np.testing.assert_allclose(idx.norms, ref_n, rtol=1e-4)
