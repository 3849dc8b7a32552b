"""Kronecker-factored projection against per-item gradients from a plain autograd loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradindex as gi
from gradindex.featurize.kronecker import KroneckerGradients
from gradindex.featurize.losses import item_losses
from tests.conftest import scheduler, tiny_unet


def _loss(out, target):
    return item_losses(out, target, "mse")


def _batch(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 1, 8, 8, generator=gen)
    target = torch.randn(n, 1, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    return x_t, t, target


def _loop_gradients(model, x_t, t, target) -> dict[str, torch.Tensor]:
    """name -> [I, *shape]: one torch.autograd.grad per item (independent of any hook)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    per_item = []
    for i in range(len(x_t)):
        out = model(x_t[i : i + 1], t[i : i + 1]).sample
        loss = (out - target[i : i + 1]).pow(2).mean()
        per_item.append(torch.autograd.grad(loss, params))
    return {n: torch.stack([g[j] for g in per_item]) for j, n in enumerate(names)}


@pytest.mark.parametrize("norm", ["auto", "ghost", "formed"])
def test_rows_and_norms_match_the_factored_projection_of_loop_gradients(norm):
    model = tiny_unet(3)
    names = [n for n, _ in model.named_parameters()]
    kron = KroneckerGradients(model, names, _loss, out_dim=1024, seed=5)
    routes = {p.route for p in kron.plan}
    assert routes == {"kronecker", "dense"}  # conv/linear weights factored, biases/norms dense
    if norm != "auto":
        for plan in kron.plan:
            plan.norm = norm if plan.route == "kronecker" else ""
    M = 2  # items in groups of two draws
    x_t, t, target = _batch(6)
    rows, item_sq, group_sq = kron.item_rows(x_t, t, target, group=M)
    ref = _loop_gradients(model, x_t, t, target)
    flat = torch.cat([ref[n].reshape(6, -1) for n in names], 1).double()  # [I, p]

    np.testing.assert_allclose(item_sq, flat.pow(2).sum(1), rtol=1e-4)
    sums = flat.view(3, M, -1).sum(1)
    np.testing.assert_allclose(group_sq, sums.pow(2).sum(1), rtol=1e-4)

    for plan in kron.plan:
        if plan.route != "kronecker":
            continue
        module = dict(model.named_modules())[plan.name.rsplit(".", 1)[0]]
        layer = kron._layers[module]
        p_out, p_in = layer["p_out"].double(), layer["p_in"].reshape(plan.d_in, -1).double()
        g = ref[plan.name].reshape(6, p_out.shape[1], -1).double()  # [I, out, in·kh·kw]
        expect = (p_out @ g @ p_in.T).reshape(6, -1)
        got = rows[:, plan.offset : plan.offset + plan.d_out * plan.d_in]
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5 * expect.abs().max())
    dense = [p.name for p in kron.plan if p.route == "dense"]
    dense_grads = torch.cat([ref[n].reshape(6, -1) for n in dense], 1)
    np.testing.assert_allclose(
        rows[:, kron.kron_dim :], kron._dense_proj.project(dense_grads), rtol=1e-4, atol=1e-6
    )


def test_inner_products_are_unbiased_over_seeds():
    """Mean over seeds of <P g, P h> -> <g, h> for a few items' full gradients (a coarse end-to-end
    check: one seed's estimate is noisy, conv_out has a single output channel, so d_out = 1)."""
    model = tiny_unet(4)
    names = [n for n, _ in model.named_parameters()]
    x_t, t, target = _batch(4, seed=1)
    flat = torch.cat([v.reshape(4, -1) for v in _loop_gradients(model, x_t, t, target).values()], 1)
    gram = (flat.double() @ flat.double().T).numpy()  # [I, I] exact
    scale = []  # least-squares factor between the projected and the exact Gram, per seed
    for seed in range(40):
        kron = KroneckerGradients(model, names, _loss, out_dim=1024, seed=seed)
        rows = kron.item_rows(x_t, t, target)[0].double().numpy()
        scale.append(float(((rows @ rows.T) * gram).sum() / (gram * gram).sum()))
    est = np.array(scale)
    stderr = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - 1.0) < 4 * stderr, (est.mean(), stderr)
    assert est.std() < 1.0  # a real compression, not noise


def test_projection_second_moment_is_the_identity():
    """E[PᵀP] = I checked directly, so a constant bias of any factor is visible (the sampled
    check above cannot see one of ~10%). Per Kronecker layer P = P_out ⊗ P_in with independent
    factors, so E[PᵀP] = I iff E[P_outᵀP_out] = I and E[P_inᵀP_in] = I: the traces
    ‖P_out‖²_F and ‖P_in‖²_F, summed over layers and seeds, must equal Σ c_out and Σ a_dim (their
    standard error computed from the Gaussian entries, here < 1%). The dense block's sparse
    JL map must keep every unit vector's norm. Together with the first test (rows equal
    P_out G P_inᵀ and the dense map applied to the loop gradients) this makes the rows unbiased."""
    model = tiny_unet(4)
    names = [n for n, _ in model.named_parameters()]
    sums = {"out": [0.0, 0.0, 0.0], "in": [0.0, 0.0, 0.0]}  # [Σ‖P‖², Σ expected, Σ variance]
    dense_sq, dense_cols = 0.0, 0
    for seed in range(20):
        kron = KroneckerGradients(model, names, _loss, out_dim=1024, seed=seed)
        for layer in kron._layers.values():
            plan = layer["plan"]
            for side, p, d in (
                ("out", layer["p_out"], plan.d_out),
                ("in", layer["p_in"], plan.d_in),
            ):
                cols = p.reshape(d, -1).shape[1]
                acc = sums[side]
                acc[0] += float(p.double().pow(2).sum())
                acc[1] += cols
                acc[2] += 2.0 * cols / d  # d·cols entries of N(0, 1/d): variance of their squares
        p_dense = kron._dense_proj.in_dim
        basis = torch.eye(p_dense)
        dense_sq += float(kron._dense_proj.project(basis).double().pow(2).sum())
        dense_cols += p_dense
    for side, (got, expect, var) in sums.items():
        stderr = np.sqrt(var) / expect
        assert stderr < 0.01, (side, stderr)  # 4 stderr < 4%: a 0.9 factor cannot hide
        assert abs(got / expect - 1.0) < 4 * stderr, (side, got / expect, stderr)
    assert dense_sq / dense_cols == pytest.approx(1.0, rel=1e-6)


def _autograd_features(model, sched, x0, spec):
    """name -> [N, *shape] TracIn a(z) = mean over draws, and the ReTrac r(z) = mean_k of
    ḡ_k / ‖ḡ_k‖ (ḡ_k: the mean over timestep k's M noise draws), from one autograd.grad per
    sample and draw of the plain DDPM loss (no hooks, no projection)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    K, M = spec.num_timesteps, spec.noise_draws
    tracin, retrac = [], []
    for z in x0:
        per_draw = []
        for t, eps in spec.draws(z.shape):
            x_t = sched.add_noise(z[None], eps[None], torch.tensor([t]))
            out = model(x_t, torch.tensor([t])).sample
            loss = (out - eps[None]).pow(2).mean()
            grads = torch.autograd.grad(loss, params)
            per_draw.append(torch.cat([g.reshape(-1) for g in grads]).double())
        g = torch.stack(per_draw).view(K, M, -1).mean(1)  # [K, p] ḡ_k
        tracin.append(g.mean(0))
        retrac.append((g / g.norm(dim=1, keepdim=True)).mean(0))
    shapes = [p.shape for p in params]

    def split(rows):
        parts = torch.stack(rows).split([int(np.prod(s)) for s in shapes], dim=1)
        return {n: part.reshape(len(rows), *s) for n, part, s in zip(names, parts, shapes)}

    return split(tracin), split(retrac)


def _kronecker_project(kron, grads):
    """P_out G P_inᵀ per factored layer, the dense block's sparse JL map on the rest: [N, d]."""
    cols = []
    for plan in kron.plan:
        if plan.route != "kronecker":
            continue
        module = kron.model.get_submodule(plan.name.rsplit(".", 1)[0])
        layer = kron._layers[module]
        p_out, p_in = layer["p_out"].double(), layer["p_in"].reshape(plan.d_in, -1).double()
        g = grads[plan.name].reshape(len(grads[plan.name]), plan.shape[0], -1)  # [N, out, in]
        cols.append((p_out @ g @ p_in.T).flatten(1))
    dense = [p.name for p in kron.plan if p.route == "dense"]
    flat = torch.cat([grads[n].flatten(1) for n in dense], 1).float()
    cols.append(kron._dense_proj.project(flat).double())
    return torch.cat(cols, 1)


def test_build_with_kronecker_projection(tmp_path, images):
    """An index built with projection='kronecker' stores exact norms (equal to a dense build's),
    reproduces its rows at query time, and stores exactly the Kronecker-projected TracIn and
    ReTrac vectors of plain autograd gradients: P_out ⊗ P_in applied to each layer's
    per-sample weight gradient (the factors of checkpoint c's map), the sparse JL map to the
    rest, ReTrac unit-normalized per checkpoint after projection."""
    from gradindex.featurize.embedding import projection_seed
    from gradindex.featurize.losses import item_loss_fn

    models = [tiny_unet(1), tiny_unet(2)]
    sched = scheduler()
    common = {"timesteps": 3, "noise_draws": 2, "proj_dim": 2048}
    dense = gi.build_index(
        checkpoints=[(m, sched) for m in models],
        data=images,
        out=tmp_path / "dense",
        spec=gi.BuildSpec(projection="identity", **common),
    )
    spec = gi.BuildSpec(projection="kronecker", **common)
    kron = gi.build_index(
        checkpoints=[(m, sched) for m in models], data=images, out=tmp_path / "kron", spec=spec
    )
    np.testing.assert_allclose(kron.norms, dense.norms, rtol=1e-4)
    again = kron.embed(images)
    for method in ("tracin", "retrac"):
        np.testing.assert_allclose(
            again[method], kron.vectors(method), rtol=1e-4, atol=1e-5 * np.abs(again[method]).max()
        )
    x0 = torch.from_numpy(images) * 2 - 1  # [0, 1] data into the model's [-1, 1]
    expect = {"tracin": [], "retrac": []}
    names = [n for n, _ in models[0].named_parameters()]
    for c, model in enumerate(models):
        a, r = _autograd_features(model, sched, x0, kron.spec)  # T filled in
        # the loop reproduces the dense build's full-space TracIn rows: same inputs and draws
        full = torch.cat([a[n].flatten(1) for n in names], 1).numpy()
        p = full.shape[1]
        stored = dense.vectors("tracin")[:, c * p : (c + 1) * p]
        np.testing.assert_allclose(stored, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())
        factors = KroneckerGradients(
            model, names, item_loss_fn("mse"), spec.proj_dim, projection_seed(spec.proj_seed, c)
        )
        expect["tracin"].append(_kronecker_project(factors, a))
        pr = _kronecker_project(factors, r)
        expect["retrac"].append(pr / pr.norm(dim=1, keepdim=True))
    for method in ("tracin", "retrac"):
        want = torch.cat(expect[method], 1).numpy()
        got = kron.vectors(method)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    routes = kron.info()["layers"]
    assert any(r.startswith("kronecker") for r in routes.values())
    assert "dense" in routes.values()
    assert set(dense.info()["layers"].values()) == {"dense"}


def test_kronecker_layer_shapes_stay_as_indexes_were_built():
    """'kronecker' (d split over the layers) keeps the factor shapes its indexes were built with,
    d_out = min(c_out, ⌊√budget⌋), d_in = min(a_dim, budget // d_out): a changed shape would
    make every query of such an index disagree with its rows."""
    import math

    model = tiny_unet(0)
    names = [n for n, _ in model.named_parameters()]
    for out_dim in (256, 300, 1000):
        kron = KroneckerGradients(model, names, _loss, out_dim=out_dim, seed=0)
        layers = [p for p in kron.plan if p.route == "kronecker"]
        dense = sum(int(np.prod(p.shape)) for p in kron.plan if p.route == "dense")
        budget = (out_dim - min(dense, max(1, int(out_dim / 8)))) // len(layers)
        for p in layers:
            c_out, a_dim = p.shape[0], int(np.prod(p.shape[1:]))
            d_out = min(c_out, math.isqrt(budget))
            assert (p.d_out, p.d_in) == (d_out, min(a_dim, budget // d_out)), (out_dim, p.name)
