"""The loss a diffusers example trainer minimised is the loss gradindex attributes
(BuildSpec.snr_weighting / snr_gamma / noise_offset / input_perturbation; issue 25 item 2).

The reference is each script's own loss, written out here as the script computes it (its
order of random calls, its weights from ᾱ_t), differentiated one sample and one draw at a time
with torch.autograd; only the draw seeds (seed, k, m) are shared with gradindex, as documented.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradindex.build.pipeline import build_index
from gradindex.errors import SpecError
from gradindex.spec import BuildSpec, draw_seed
from tests.conftest import assert_rows_close, scheduler, tiny_unet

N, K, M = 3, 3, 2
TIMESTEPS = (40, 380, 910)


def script_loss(sched, model, x0, t, gen, case, cond=None):
    """One sample's loss at timestep t as the named diffusers script computes it."""
    shape = x0.shape  # (C, H, W)
    noise = torch.randn(shape, generator=gen)
    if case.get("noise_offset"):  # noise += offset * randn((bsz, C, 1, 1))
        noise = noise + case["noise_offset"] * torch.randn((shape[0], 1, 1), generator=gen)
    x_in = noise
    if case.get("input_perturbation"):  # new_noise = noise + p * randn_like(noise)
        x_in = noise + case["input_perturbation"] * torch.randn(shape, generator=gen)
    tt = torch.tensor([t])
    noisy = sched.add_noise(x0[None], x_in[None], tt)
    out = model(noisy, tt, **(cond or {})).sample
    ptype = sched.config.prediction_type
    alpha_t = sched.alphas_cumprod[t]
    if case["script"] == "unconditional":  # train_unconditional.py, sample prediction
        snr_weights = alpha_t / (1 - alpha_t)
        return (snr_weights * F.mse_loss(out.float(), x0[None], reduction="none")).mean()
    target = noise[None] if ptype == "epsilon" else sched.get_velocity(x0[None], noise[None], tt)
    loss = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if case.get("snr_gamma") is None:
        return loss.mean()
    snr = alpha_t / (1 - alpha_t)  # (sqrt(ᾱ) / sqrt(1 - ᾱ))², as compute_snr
    weight = torch.minimum(snr, torch.tensor(case["snr_gamma"]))
    weight = weight / snr if ptype == "epsilon" else weight / (snr + 1)
    return (loss * weight).mean()


def reference(
    model, sched, x0s, case, seed=0, conds=None, names=None, timesteps=TIMESTEPS, M=M, scale=None
):
    """TracIn / ReTrac rows (identity projection, one checkpoint) and per-draw norms; conds:
    per-sample model keyword arguments; names: the parameters differentiated (default all);
    scale: a [p] preconditioner every per-draw gradient is multiplied by first (Adam's)."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    tracin, retrac, norms = [], [], []
    for i, x0 in enumerate(x0s):
        per_k, n = [], []
        for k, t in enumerate(timesteps):
            gs = []
            for m in range(M):
                gen = torch.Generator().manual_seed(draw_seed(seed, k, m))
                loss = script_loss(sched, model, x0, t, gen, case, conds and conds[i])
                g = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()
                g = g if scale is None else g * scale.double()
                gs.append(g)
                n.append(g.norm())
            per_k.append(torch.stack(gs).mean(0))
        tracin.append(torch.stack(per_k).mean(0))
        r = torch.stack([g / g.norm() for g in per_k]).mean(0)
        retrac.append(r / r.norm())
        norms.append(torch.stack(n))
    return [torch.stack(a).numpy() for a in (tracin, retrac, norms)]


CASES = {
    "unconditional --prediction_type sample": (
        {"script": "unconditional"},
        "sample",
        {"snr_weighting": "snr"},
    ),
    "text_to_image --snr_gamma 5 --noise_offset 0.1 --input_perturbation 0.1": (
        {"script": "t2i", "snr_gamma": 5.0, "noise_offset": 0.1, "input_perturbation": 0.1},
        "epsilon",
        {
            "snr_weighting": "min_snr",
            "snr_gamma": 5.0,
            "noise_offset": 0.1,
            "input_perturbation": 0.1,
        },
    ),  # fmt: skip
    "text_to_image --snr_gamma 2 v_prediction": (
        {"script": "t2i", "snr_gamma": 2.0},
        "v_prediction",
        {"snr_weighting": "min_snr", "snr_gamma": 2.0},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rows_are_gradients_of_the_scripts_own_loss(name, images, backend, tmp_path):
    case, ptype, fields = CASES[name]
    model, sched = tiny_unet(3), scheduler(ptype)
    spec = BuildSpec(
        projection="identity", timesteps=TIMESTEPS, noise_draws=M, data_range=(0.0, 1.0),
        batch_size=2, **fields,
    )  # fmt: skip
    idx = build_index(
        checkpoints=[(model, sched)], data=images[:N], out=tmp_path / "idx", spec=spec,
        progress=False, fidelity_sample=0,
    )  # fmt: skip
    x0s = torch.from_numpy(images[:N]) * 2 - 1
    tracin, retrac, norms = reference(model, sched, x0s, case)
    assert_rows_close(idx.vectors("tracin"), tracin)
    assert_rows_close(idx.vectors("retrac"), retrac)
    assert_rows_close(idx.norms[:, 0], norms)


def test_lora_run_logged_snr_gamma_gives_the_scripts_rows(tmp_path, sd_run, caption_folder, pixels):
    """train_text_to_image_lora.py --snr_gamma 5 --noise_offset 0.05: its logged arguments
    (accelerate's TensorBoard tracker, as init_trackers writes them) set the loss of a build
    that names none, and the rows are the gradients of that script's per-sample loss."""
    pytest.importorskip("peft")
    from accelerate.tracking import TensorBoardTracker
    from diffusers import DDPMScheduler

    from tests.diffusion_refs import CAPTIONS, reference_inputs
    from tests.inputs.test_lora import lora_unet, save_lora

    out = tmp_path / "lora_out"
    model = lora_unet(11)
    save_lora(model, out)
    tracker = TensorBoardTracker("text2image-fine-tune", out / "logs")
    tracker.start()
    tracker.store_init_configuration({"snr_gamma": 5.0, "noise_offset": 0.05, "rank": 2})
    tracker.finish()
    spec = BuildSpec(projection="identity", timesteps=TIMESTEPS, noise_draws=M)
    idx = build_index(
        checkpoints=[out], base_model=sd_run, data=str(caption_folder), out=tmp_path / "idx",
        spec=spec, progress=False, fidelity_sample=0,
    )  # fmt: skip
    assert (idx.spec.snr_weighting, idx.spec.snr_gamma, idx.spec.noise_offset) == (
        "min_snr", 5.0, 0.05,
    )  # fmt: skip
    assert set(idx.manifest["run_records"]["taken"]) == {
        "snr_weighting",
        "snr_gamma",
        "noise_offset",
    }
    latents, conds = reference_inputs(sd_run, pixels, CAPTIONS)
    sched = DDPMScheduler.from_pretrained(sd_run / "scheduler")
    names = {n for n, _ in model.named_parameters() if "lora_" in n}
    case = {"script": "t2i", "snr_gamma": 5.0, "noise_offset": 0.05}
    tracin, retrac, norms = reference(model, sched, latents, case, conds=conds, names=names)
    assert_rows_close(idx.vectors("tracin"), tracin)
    assert_rows_close(idx.vectors("retrac"), retrac)
    assert_rows_close(idx.norms[:, 0], norms)


def test_kronecker_rows_carry_the_weighted_loss(images, tmp_path):
    """The Kronecker featurizer shares the weighting: its exact per-draw norms are those of
    the weighted loss's gradients, and its ReTrac rows those of the unweighted loss (ReTrac
    normalises each timestep's mean gradient, so a per-timestep weight cancels)."""
    case = {"script": "t2i", "snr_gamma": 2.0}
    model, sched = tiny_unet(3), scheduler("epsilon")
    rows = {}
    for name, fields in (("min_snr", {"snr_weighting": "min_snr", "snr_gamma": 2.0}),
                         ("none", {})):  # fmt: skip
        spec = BuildSpec(
            projection="kronecker", proj_dim=64, timesteps=TIMESTEPS, noise_draws=M,
            data_range=(0.0, 1.0), **fields,
        )  # fmt: skip
        rows[name] = build_index(
            checkpoints=[(model, sched)], data=images[:N], out=tmp_path / name, spec=spec,
            progress=False, fidelity_sample=0,
        )  # fmt: skip
    *_, norms = reference(model, sched, torch.from_numpy(images[:N]) * 2 - 1, case)
    assert_rows_close(rows["min_snr"].norms[:, 0], norms)
    assert_rows_close(rows["min_snr"].vectors("retrac"), rows["none"].vectors("retrac"))
    assert not np.allclose(rows["min_snr"].vectors("tracin"), rows["none"].vectors("tracin"))


def test_unweighted_spec_differs_from_the_trained_loss(images, tmp_path):
    """Guards the test above: without the weighting the rows are not the script's."""
    model, sched = tiny_unet(3), scheduler("sample")
    spec = BuildSpec(projection="identity", timesteps=TIMESTEPS, noise_draws=M,
                     data_range=(0.0, 1.0))  # fmt: skip
    with pytest.warns(UserWarning, match="--snr-weighting snr"):
        idx = build_index(
            checkpoints=[(model, sched)], data=images[:N], out=tmp_path / "idx", spec=spec,
            progress=False, fidelity_sample=0,
        )  # fmt: skip
    _, _, norms = reference(model, sched, torch.from_numpy(images[:N]) * 2 - 1,
                            CASES["unconditional --prediction_type sample"][0])  # fmt: skip
    assert not np.allclose(idx.norms[:, 0], norms, rtol=0.1)


def test_defaults_keep_existing_fingerprints():
    """The new fields are left out of the JSON at their defaults, so indexes built before them
    keep their spec fingerprint; set, they round-trip exactly."""
    spec = BuildSpec(num_train_timesteps=1000)
    assert not {"snr_weighting", "snr_gamma", "noise_offset", "input_perturbation"} & set(
        spec.to_dict()
    )
    # a default build of a small model stores projection 'sjlt', precision 'float32' (auto)
    resolved = BuildSpec(projection="sjlt", precision="float32")
    assert resolved.fingerprint() == "fbc156a204638712"  # as gradindex 0.x recorded it
    assert BuildSpec.from_dict(spec.to_dict()).fingerprint() == spec.fingerprint()
    full = BuildSpec(snr_weighting="min_snr", snr_gamma=5, noise_offset=0.1, input_perturbation=0.2)
    back = BuildSpec.from_json(full.to_json())
    assert back == full and back.snr_gamma == 5.0 and isinstance(back.snr_gamma, float)
    assert back.fingerprint() != BuildSpec().fingerprint()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"snr_weighting": "min_snr"}, "snr_gamma=None: snr_weighting='min_snr' needs"),
        ({"snr_gamma": 5.0}, "is the gamma of snr_weighting='min_snr'"),
        ({"snr_weighting": "min_snr", "snr_gamma": -1.0}, "positive finite gamma"),
        ({"snr_weighting": "huber"}, "must be one of none, snr, min_snr"),
        ({"noise_offset": -0.1}, "noise_offset=-0.1: must be a finite number >= 0"),
        ({"input_perturbation": float("nan")}, "input_perturbation=nan"),
        ({"checkpoint_weights": "automatic"}, "must be 'auto' or positive finite numbers"),
    ],
)
def test_bad_weighting_fields_are_one_line_spec_errors(fields, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        BuildSpec(**fields)


def test_offset_and_perturbation_draws_follow_the_scripts_order():
    """ε + offset·randn(C, 1, 1), then ξ from the same generator: the target keeps ε."""
    spec = BuildSpec(timesteps=(5,), noise_offset=0.3, input_perturbation=0.2)
    gen = torch.Generator().manual_seed(draw_seed(0, 0, 0))
    eps = torch.randn(2, 3, 3, generator=gen)
    eps = eps + 0.3 * torch.randn(2, 1, 1, generator=gen)
    x_in = eps + 0.2 * torch.randn(2, 3, 3, generator=gen)
    torch.testing.assert_close(spec.draws((2, 3, 3))[0][1], eps)
    torch.testing.assert_close(spec.input_noise((2, 3, 3))[0], x_in)
    plain = BuildSpec(timesteps=(5,))
    assert plain.input_noise((2, 3, 3)) is None
    torch.testing.assert_close(
        plain.draws((2, 3, 3))[0][1],
        torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(draw_seed(0, 0, 0))),
    )


def test_a_weight_that_is_not_finite_at_a_chosen_timestep_is_refused():
    """A zero-terminal-SNR schedule has snr = 0 at its last timestep: min(snr, γ)/snr is 0/0."""
    from diffusers import DDPMScheduler

    from gradindex.errors import ModelError
    from gradindex.featurize.losses import loss_weights

    sched = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    spec = BuildSpec(timesteps=(10, 999), snr_weighting="min_snr", snr_gamma=5.0)
    with pytest.raises(ModelError, match=r"not finite at timestep\(s\) \[999\]"):
        loss_weights(spec, sched, "epsilon")
    weights = loss_weights(spec.replace(timesteps=(10, 500)), sched, "epsilon")
    ac = sched.alphas_cumprod
    snr = ac / (1 - ac)
    torch.testing.assert_close(weights[500], torch.minimum(snr[500], torch.tensor(5.0)) / snr[500])


def test_an_infinite_snr_weight_is_refused_too():
    """A schedule whose first beta is 0 has ᾱ_0 = 1: snr(0) = 1/0 = inf, the weight of
    snr_weighting='snr' there (not a NaN, which the zero-terminal case above gives)."""
    from diffusers import DDPMScheduler

    from gradindex.errors import ModelError
    from gradindex.featurize.losses import loss_weights

    betas = [0.02 * i for i in range(10)]  # ᾱ_t = Π (1 - β_s): 1 at t = 0
    sched = DDPMScheduler(num_train_timesteps=10, trained_betas=betas)
    spec = BuildSpec(timesteps=(0, 5), snr_weighting="snr", num_train_timesteps=10)
    with pytest.raises(ModelError, match=r"not finite at timestep\(s\) \[0\]"):
        loss_weights(spec, sched, "sample")
    weights = loss_weights(spec.replace(timesteps=(3, 5)), sched, "sample")
    ac = torch.tensor([1.0 - b for b in betas], dtype=torch.float64).cumprod(0)
    torch.testing.assert_close(weights[5].double(), ac[5] / (1 - ac[5]), rtol=1e-5, atol=0)
