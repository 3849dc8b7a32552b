"""'auto' projection / precision, and Kronecker rows with projected norms, against plain autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradindex as gi
import gradindex.featurize.auto as auto
from gradindex.featurize.auto import resolve_auto
from gradindex.featurize.embedding import projection_seed
from gradindex.featurize.kronecker import KroneckerGradients
from gradindex.featurize.losses import item_loss_fn
from gradindex.store.describe import format_info
from tests.conftest import scheduler, tiny_unet
from tests.featurize.test_kronecker import _kronecker_project


def _draw_gradients(model, sched, x0, spec) -> list[dict[str, torch.Tensor]]:
    """Per draw (k, m), in the spec's order: name -> [N, *shape] gradients of the plain DDPM
    loss, one torch.autograd.grad per sample and draw (no hooks, no projection)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    out = []
    for t, eps in spec.draws(x0.shape[1:]):
        per_sample = []
        for z in x0:
            x_t = sched.add_noise(z[None], eps[None], torch.tensor([t]))
            loss = (model(x_t, torch.tensor([t])).sample - eps[None]).pow(2).mean()
            per_sample.append(torch.autograd.grad(loss, params))
        out.append(
            {n: torch.stack([g[j] for g in per_sample]).double() for j, n in enumerate(names)}
        )
    return out


def test_projected_norms_are_the_rows_own_and_retrac_averages_projected_unit_vectors(
    tmp_path, images
):
    """norms='projected': each draw's stored norm is ‖P g‖ of its Kronecker-projected gradient,
    ReTrac the mean over timesteps of P ḡ_k / ‖P ḡ_k‖ (ḡ_k: the mean of timestep k's noise
    draws), TracIn unchanged (the mean of P g): all from autograd gradients projected here."""
    model, sched = tiny_unet(4), scheduler()
    spec = gi.BuildSpec(
        projection="kronecker", norms="projected", timesteps=3, noise_draws=2, proj_dim=1024
    )
    idx = gi.build_index(checkpoints=[(model, sched)], data=images, out=tmp_path / "i", spec=spec)
    assert idx.spec.norms == "projected" and idx.spec.precision == "float32"
    assert all("projected norm" in r for r in idx.info()["layers"].values() if r != "dense")
    assert any(
        line.startswith("norms") and "projections" in line for line in format_info(idx.info())
    )
    names = [n for n, _ in model.named_parameters()]
    kron = KroneckerGradients(
        model, names, item_loss_fn("mse"), spec.proj_dim, projection_seed(spec.proj_seed, 0)
    )
    x0 = torch.from_numpy(images) * 2 - 1
    projected = torch.stack(
        [_kronecker_project(kron, g) for g in _draw_gradients(model, sched, x0, idx.spec)], 1
    )  # [N, K·M, d]
    n, K, M = len(images), 3, 2
    np.testing.assert_allclose(idx.norms[:, 0], projected.norm(dim=2), rtol=1e-4)
    per_t = projected.view(n, K, M, -1).mean(2)  # P ḡ_k
    retrac = (per_t / per_t.norm(dim=2, keepdim=True)).mean(1)
    want = {"tracin": projected.mean(1), "retrac": retrac / retrac.norm(dim=1, keepdim=True)}
    for method, w in want.items():
        w = w.numpy()
        got = idx.vectors(method)
        np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-5 * np.abs(w).max())
    # and not the full-space norms an exact build stores
    exact = gi.build_index(
        checkpoints=[(model, sched)],
        data=images,
        out=tmp_path / "e",
        spec=spec.replace(norms="exact"),
    )
    assert np.abs(exact.norms / idx.norms - 1).max() > 1e-3
    np.testing.assert_allclose(exact.vectors("tracin"), idx.vectors("tracin"), rtol=1e-4, atol=1e-6)


def _kronecker_sjlt_project(kron, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N, d], inner [N, U]): each factored layer's P_out G P_inᵀ and the dense
    parameters' own gradients side by side (inner), then the final sparse JL map (rows)."""
    cols = []
    for plan in kron.plan:
        g = grads[plan.name]
        if plan.route == "dense":
            continue
        layer = kron._layers[kron.model.get_submodule(plan.name.rsplit(".", 1)[0])]
        p_out, p_in = layer["p_out"].double(), layer["p_in"].reshape(plan.d_in, -1).double()
        cols.append((p_out @ g.reshape(len(g), plan.shape[0], -1) @ p_in.T).flatten(1))
    cols += [grads[p.name].flatten(1) for p in kron.plan if p.route == "dense"]
    inner = torch.cat(cols, 1)
    return kron._final.project(inner.float()).double(), inner


def test_kronecker_sjlt_rows_are_the_sparse_map_of_layer_factors(tmp_path, images):
    """'kronecker-sjlt': every layer gets LAYER_DIM outputs (cost-shaped factors), the dense
    gradients stay whole, one sparse JL map takes them to d; projected norms are the layer
    outputs' (inner) norms, ReTrac normalizes by them, all against autograd gradients."""
    from gradindex.featurize.kronecker import LAYER_DIM

    model, sched = tiny_unet(6), scheduler()
    spec = gi.BuildSpec(
        projection="kronecker-sjlt", norms="projected", timesteps=2, noise_draws=2, proj_dim=256
    )
    idx = gi.build_index(checkpoints=[(model, sched)], data=images, out=tmp_path / "i", spec=spec)
    names = [n for n, _ in model.named_parameters()]
    kron = KroneckerGradients(
        model,
        names,
        item_loss_fn("mse"),
        256,
        projection_seed(spec.proj_seed, 0),
        layer_dim=LAYER_DIM,
    )
    shapes = [(p.d_out, p.d_in) for p in kron.plan if p.route != "dense"]
    assert all(a * b <= LAYER_DIM for a, b in shapes) and kron.out_dim == 256
    for plan in kron.plan:  # layers of at most LAYER_DIM weights are kept whole (exact)
        small = int(np.prod(plan.shape)) <= LAYER_DIM
        assert (plan.route == "dense") == (small or not plan.name.endswith("weight")), plan.name
        if plan.route == "kronecker" and plan.d_out == plan.shape[0]:  # a whole side: identity
            layer = kron._layers[kron.model.get_submodule(plan.name.rsplit(".", 1)[0])]
            assert torch.equal(layer["p_out"], torch.eye(plan.d_out))
    x0 = torch.from_numpy(images) * 2 - 1
    rows, inner = zip(
        *(_kronecker_sjlt_project(kron, g) for g in _draw_gradients(model, sched, x0, idx.spec))
    )
    rows, inner = torch.stack(rows, 1), torch.stack(inner, 1)  # [N, K·M, d] / [N, K·M, U]
    np.testing.assert_allclose(idx.norms[:, 0], inner.norm(dim=2), rtol=1e-4)
    n = len(images)
    per_t, scale = rows.view(n, 2, 2, -1).mean(2), inner.view(n, 2, 2, -1).mean(2).norm(dim=2)
    retrac = (per_t / scale[..., None]).mean(1)
    want = {"tracin": rows.mean(1), "retrac": retrac / retrac.norm(dim=1, keepdim=True)}
    for method, w in want.items():
        w = w.numpy()
        np.testing.assert_allclose(idx.vectors(method), w, rtol=1e-3, atol=1e-5 * np.abs(w).max())


def test_norms_projected_needs_kronecker():
    with pytest.raises(gi.SpecError, match="norms='projected'.*'kronecker' projection"):
        gi.BuildSpec(projection="sjlt", norms="projected")


def test_auto_picks_sjlt_exact_float32_for_a_small_model(monkeypatch):
    """float32 even on a device with bfloat16 units: bfloat16 only comes with the large path."""
    model = tiny_unet(0)
    names = [n for n, _ in model.named_parameters()]
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: True)
    spec = resolve_auto(gi.BuildSpec(), model, names, "cpu")
    assert (spec.projection, spec.norms, spec.precision) == ("sjlt", "exact", "float32")
    # the stored form of that spec is the one indexes had before 'auto': same fingerprint
    assert "precision" not in spec.identity() and "norms" not in spec.identity()
    # float32 and exact written: "auto" is their default now
    assert gi.BuildSpec.from_json(spec.to_json()) == spec
    assert spec.fingerprint() == gi.BuildSpec(projection="sjlt", precision="float32").fingerprint()


@pytest.mark.parametrize("bf16", [False, True])
def test_auto_picks_kronecker_projected_for_a_large_model(monkeypatch, bf16):
    """Above the full path's buffer line: kronecker with projected norms, bfloat16 only where
    the device has bfloat16 units; explicit choices and Adam preconditioning are kept."""
    model = tiny_unet(0)
    names = [n for n, _ in model.named_parameters()]
    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 0)  # every model is "large"
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: bf16)
    spec = resolve_auto(gi.BuildSpec(), model, names, "cpu")
    assert (spec.projection, spec.norms) == ("kronecker-sjlt", "projected")
    assert spec.precision == ("bfloat16" if bf16 else "float32")
    kept = resolve_auto(gi.BuildSpec(precision="float32"), model, names, "cpu")
    assert (kept.projection, kept.precision) == ("kronecker-sjlt", "float32")
    explicit = resolve_auto(gi.BuildSpec(projection="sjlt"), model, names, "cpu")
    assert (explicit.projection, explicit.norms, explicit.precision) == ("sjlt", "exact", "float32")
    adam = resolve_auto(gi.BuildSpec(precondition="adam"), model, names, "cpu")
    assert adam.projection == "sjlt"
    batchnorm = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    bn_names = [n for n, _ in batchnorm.named_parameters()]
    assert resolve_auto(gi.BuildSpec(), batchnorm, bn_names, "cpu").projection == "sjlt"


def test_large_model_line_is_the_full_paths_buffer_size():
    spec = gi.BuildSpec()  # batch 16, one noise draw: 48 floats per parameter
    assert not auto.large_model(spec, 620_000)  # the demo UNet: 0.12 GB
    assert auto.large_model(spec, 35_700_000)  # the CIFAR-10 DDPM: 6.9 GB


def test_the_large_model_line_is_crossed_only_past_it():
    """The full path's buffers, 4 bytes × p × (B·M + 2·B): batch 16 with 2 noise draws is 64
    floats, 256 bytes per parameter, so 2^22 parameters fill the 1 GiB line (not past it)."""
    spec = gi.BuildSpec(noise_draws=2)
    assert not auto.large_model(spec, 1 << 22)
    assert auto.large_model(spec, (1 << 22) + 1)


def test_auto_decides_by_the_selected_parameters(monkeypatch):
    """A model past the line whose selected parameters (conv_in, conv_out: 153) are under it
    keeps the full path: the line counts what gradients are taken over."""
    model = tiny_unet(0)  # 44,969 parameters
    names = [n for n, _ in model.named_parameters()]
    few = [n for n in names if n.startswith(("conv_in.", "conv_out."))]
    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 192 * 10_000)  # batch 16: 192 bytes a parameter
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: False)
    assert resolve_auto(gi.BuildSpec(), model, names, "cpu").projection == "kronecker-sjlt"
    assert resolve_auto(gi.BuildSpec(), model, few, "cpu").projection == "sjlt"


def test_shards_built_with_other_batch_sizes_take_the_same_choice_and_merge(
    monkeypatch, tmp_path, images
):
    """batch_size is not part of an index's identity (a shard rebuilt with a smaller batch
    after running out of memory is the same index), so it must not move auto's line: the tiny
    UNet (44,969 parameters) past a 1 MiB line at the default batch 16 (8.6 MB of buffers) is
    large at batch 1 too (0.54 MB), and shards built at batches 4 and 1 merge into the rows of
    a one-piece build."""
    from gradindex.build.shards import merge_shards

    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 1 << 20)
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: False)
    model, sched = tiny_unet(1), scheduler()
    names = [n for n, _ in model.named_parameters()]
    small_batch = resolve_auto(gi.BuildSpec(batch_size=1), model, names, "cpu")
    assert (small_batch.projection, small_batch.norms) == ("kronecker-sjlt", "projected")
    spec = gi.BuildSpec(timesteps=2, proj_dim=64)
    parts = []
    for k, batch in enumerate((4, 1)):
        parts.append(tmp_path / f"s{k}")
        gi.build_index(
            checkpoints=[(model, sched)], data=images, out=parts[-1], progress=False,
            spec=spec.replace(batch_size=batch), shard=(k, 2), fidelity_sample=0,
        )  # fmt: skip
    merged = merge_shards(tmp_path / "all", parts)
    whole = gi.build_index(
        checkpoints=[(model, sched)], data=images, out=tmp_path / "one", spec=spec,
        progress=False, fidelity_sample=0,
    )  # fmt: skip
    assert merged.spec.projection == whole.spec.projection == "kronecker-sjlt"
    for method in ("tracin", "retrac"):
        want = whole.vectors(method)
        np.testing.assert_allclose(merged.vectors(method), want, rtol=1e-4, atol=1e-6)


def test_native_bfloat16_on_cuda_needs_bfloat16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert auto.native_bfloat16("cuda") is supported


def test_a_default_build_of_a_large_model_stores_its_choice_and_queries_repeat_it(
    monkeypatch, tmp_path, images
):
    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 0)
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: False)
    model, sched = tiny_unet(2), scheduler()
    idx = gi.build_index(
        checkpoints=[(model, sched)],
        data=images,
        out=tmp_path / "i",
        spec=gi.BuildSpec(timesteps=2, proj_dim=512),
    )
    assert (idx.spec.projection, idx.spec.norms, idx.spec.precision) == (
        "kronecker-sjlt",
        "projected",
        "float32",
    )
    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 1 << 40)  # the query must not decide again
    reopened = gi.AttributionIndex.open(tmp_path / "i", checkpoints=[(model, sched)])
    again = reopened.embed(images[:3])
    for method in ("tracin", "retrac"):
        want = idx.vectors(method)[:3]
        np.testing.assert_allclose(again[method], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_stored_specs_without_precision_read_as_float32():
    """Indexes built before 'auto' stored no precision (float32 was left out): reading them must
    not turn it into 'auto'."""
    old = gi.BuildSpec(projection="sjlt", precision="float32").to_dict()
    del old["precision"]  # as gradindex 0.x and session 11 stored a float32 spec
    assert gi.BuildSpec.from_stored(old).precision == "float32"
    assert gi.BuildSpec.from_dict(old).precision == "auto"  # why stored specs use from_stored


def test_a_built_spec_answers_a_request_whose_auto_fields_it_decided():
    """The demo reuses a finished index when its stored spec answers the request: 'auto' takes
    any decided value, every other field must be equal."""
    small = gi.BuildSpec(projection="sjlt", precision="float32")
    large = gi.BuildSpec(projection="kronecker", norms="projected", precision="bfloat16")
    for built in (small, large):
        assert built.answers(gi.BuildSpec())
        assert not built.answers(gi.BuildSpec(timesteps=3))
    assert small.answers(gi.BuildSpec(projection="sjlt"))
    assert not small.answers(gi.BuildSpec(projection="kronecker"))
    assert not large.answers(gi.BuildSpec(precision="float32"))
    assert not large.answers(gi.BuildSpec(projection="kronecker"))  # asks for exact norms


def test_native_bfloat16_reads_the_cpu_flags(tmp_path, monkeypatch):
    """True only with a bfloat16 dot-product flag in /proc/cpuinfo (or a CUDA device that
    supports it); a device type without bfloat16 units is False."""
    import builtins

    real_open = builtins.open
    for flags, want in (
        ("fpu avx512f avx512_bf16", True),
        ("fpu amx_bf16 sse", True),
        ("fpu avx512f", False),
    ):
        info = tmp_path / f"cpuinfo{want}"
        info.write_text(f"processor : 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(
            builtins,
            "open",
            lambda p, *a, _info=info, **k: real_open(_info if p == "/proc/cpuinfo" else p, *a, **k),
        )
        assert auto.native_bfloat16("cpu") is want
    monkeypatch.setattr(builtins, "open", real_open)
    assert auto.native_bfloat16("meta") is False


def test_a_featurizer_given_an_auto_spec_takes_the_layout_auto_picks(monkeypatch):
    """KroneckerFeaturizer handed an unresolved spec for a large model builds the
    kronecker-sjlt layout (a final sparse JL map, projected norms), as the build would."""
    from gradindex.featurize.kronecker import KroneckerFeaturizer
    from gradindex.inputs.models import load_checkpoints

    monkeypatch.setattr(auto, "FULL_PATH_BYTES", 0)
    monkeypatch.setattr(auto, "native_bfloat16", lambda device: False)
    ckpt = load_checkpoints([(tiny_unet(3), scheduler())])[0]
    feat = KroneckerFeaturizer(ckpt, gi.BuildSpec(proj_dim=256), seed=0)
    assert feat.spec.projection == "kronecker-sjlt" and feat.kron.norms == "projected"
    assert feat.kron._final is not None and feat.row_dim == 256
