"""Stored rows against DESIGN §1 computed by an independent per-sample autograd loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradindex as gi
from gradindex.build.pipeline import _resolve_timesteps
from gradindex.featurize.gradients import GradientFeaturizer, select_parameters
from gradindex.inputs.models import load_checkpoints
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows, rel_err


@pytest.mark.parametrize(
    "loss,prediction_type", [("mse", "epsilon"), ("l1", "v_prediction"), ("square", "epsilon")]
)
def test_identity_rows_match_autograd_loop(tmp_path, images, loss, prediction_type):
    sched = scheduler(prediction_type)
    models = [tiny_unet(1), tiny_unet(2)]
    weights = (0.5, 2.0)
    spec = gi.BuildSpec(
        projection="identity",
        timesteps=3,
        noise_draws=2,
        loss=loss,
        checkpoint_weights=weights,
        batch_size=3,
        seed=7,
    )
    imgs = images[:5]
    idx = gi.build_index(
        checkpoints=[(m, sched) for m in models],
        data=imgs,
        out=tmp_path / "idx",
        spec=spec,
        progress=False,
    )
    x0s = torch.from_numpy(imgs) * 2 - 1  # data range [0, 1] -> model range [-1, 1]
    ref_t, ref_r, ref_n = reference_rows(
        models, sched, x0s, [{}] * len(x0s), idx.spec, weights, loss
    )
    assert idx.vectors("tracin").shape == ref_t.shape
    assert rel_err(idx.vectors("tracin"), ref_t).max() <= 1e-4
    assert rel_err(idx.vectors("retrac"), ref_r).max() <= 1e-4
    np.testing.assert_allclose(idx.norms, ref_n, rtol=1e-4)
    assert idx.norms.shape == (5, 2, 6)


@pytest.mark.parametrize("backend", ["hooks", "vmap"])
def test_features_summed_over_several_gradient_calls_match_autograd_loop(images, backend):
    """max_items small enough that the K timesteps take 3 gradient calls (then 2): the features
    accumulated across calls equal the independent loop's (a_c, r_c and every draw's norm)."""
    sched = scheduler()
    model = tiny_unet(4)
    ckpt = load_checkpoints([(model, sched)])[0]
    spec = _resolve_timesteps(
        gi.BuildSpec(projection="identity", timesteps=3, noise_draws=2, seed=5),
        ckpt.num_train_timesteps,
    )
    x0 = torch.from_numpy(images[:3]) * 2 - 1
    ref_t, ref_r, ref_n = reference_rows([model], sched, x0, [{}] * 3, spec, (1.0,))
    for max_items in (3 * 2, 2 * 3 * 2):  # B·M items: one timestep per call; then two
        feat = GradientFeaturizer(ckpt, spec, backend=backend, max_items=max_items)
        f = feat.featurize(x0, spec.draws(x0.shape[1:]))
        retrac = f.retrac / f.retrac.norm(dim=1, keepdim=True)  # stored rows: r_c / ‖r_c‖
        assert rel_err(f.tracin.numpy(), ref_t).max() <= 1e-4
        assert rel_err(retrac.numpy(), ref_r).max() <= 1e-4
        np.testing.assert_allclose(f.norms.numpy(), ref_n[:, 0], rtol=1e-4)


def test_explicit_timesteps_and_param_globs(tmp_path, images):
    sched = scheduler()
    model = tiny_unet(3)
    spec = gi.BuildSpec(projection="identity", timesteps=(10, 500, 990), params=("up_blocks.*",))
    idx = gi.build_index(
        checkpoints=[(model, sched)], data=images[:2], out=tmp_path / "i", spec=spec, progress=False
    )
    names = select_parameters(model, ("up_blocks.*",))
    assert all(n.startswith("up_blocks.") for n in names)
    assert idx.dim == sum(dict(model.named_parameters())[n].numel() for n in names)
    # gradient restricted to the globbed parameters equals the slice of the full gradient
    full = gi.build_index(
        checkpoints=[(model, sched)],
        data=images[:2],
        out=tmp_path / "f",
        spec=spec.replace(params=None),
        progress=False,
    )
    order = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets = np.cumsum([0] + [sizes[n] for n in order])
    cols = np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(order) if n in names]
    )
    np.testing.assert_allclose(
        idx.vectors("tracin"), full.vectors("tracin")[:, cols], rtol=1e-5, atol=1e-9
    )


def test_unknown_param_glob_is_an_error():
    with pytest.raises(gi.SpecError, match="matches no parameter"):
        select_parameters(tiny_unet(0), ("nope.*",))


def test_bad_featurizer_arguments_and_draw_counts_are_spec_errors():
    """A zero item cap and a draw list of the wrong length (too few or too many) are refused
    before any gradient is taken."""
    ckpt = load_checkpoints([(tiny_unet(0), scheduler())])[0]
    spec = gi.BuildSpec(projection="identity", timesteps=2, num_train_timesteps=1000)
    for kwargs, message in (
        ({"backend": "jax"}, "backend='jax'"),
        ({"max_items": 0}, "max_items=0"),
        ({"max_bytes": 0}, "max_bytes=0"),
    ):
        with pytest.raises(gi.SpecError, match=f"^{message}: must be"):
            GradientFeaturizer(ckpt, spec, **kwargs)
    feat = GradientFeaturizer(ckpt, spec)
    x0, draws = torch.zeros(1, 1, 8, 8), spec.draws((1, 8, 8))
    for wrong in (draws[:1], draws + draws[:1]):
        with pytest.raises(gi.SpecError, match=f"^expected 2 draws, got {len(wrong)}$"):
            feat.featurize(x0, wrong)


def test_frozen_parameters_are_left_out_by_default_and_taken_when_a_pattern_names_them():
    """A run that froze part of the model (a LoRA base layer): the default takes the trainable
    parameters; an explicit pattern reaches frozen ones too."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert select_parameters(model, None) == ["1.weight", "1.bias"]
    assert select_parameters(model, ("0.*",)) == ["0.weight", "0.bias"]
    assert select_parameters(model, ("*.weight",)) == ["0.weight", "1.weight"]


def test_float64_images_give_the_float32_features(images):
    """Images given in float64 are taken in float32, the model's dtype."""
    ckpt = load_checkpoints([(tiny_unet(2), scheduler())])[0]
    spec = gi.BuildSpec(projection="identity", timesteps=2, num_train_timesteps=1000)
    feat = GradientFeaturizer(ckpt, spec)
    x0 = torch.from_numpy(images[:2]) * 2 - 1
    want = feat.featurize(x0, spec.draws(x0.shape[1:]))
    got = feat.featurize(x0.double(), spec.draws(x0.shape[1:]))
    assert got.tracin.dtype == torch.float32
    torch.testing.assert_close(got.tracin, want.tracin)
