"""A Kronecker build estimates its fidelity from two independent halves of its stored rows
(gradindex.featurize.halves): the halves against P_out[:h] ⊗ P_in[:h'] (and the rest) applied
to plain autograd gradients, and no second featurizing of the sample."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import gradindex as gi
import gradindex.featurize.fidelity
from gradindex.featurize.embedding import projection_seed
from gradindex.featurize.gradients import GradientFeaturizer
from gradindex.featurize.halves import noise_from_halves
from gradindex.featurize.kronecker import KroneckerGradients
from gradindex.featurize.losses import item_loss_fn
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows

WEIGHTS = (1.0, 2.0)


def _images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _build(path, models, imgs, spec, sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # below-the-bar warnings at this tiny size
        return gi.build_index(
            checkpoints=[(m, scheduler()) for m in models], data=imgs, out=path, spec=spec,
            progress=False, fidelity_sample=sample,
        )  # fmt: skip


def _half_features(kron: KroneckerGradients, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both halves of the map applied to full-space rows flat [N, p] (named_parameters order):
    per factored layer with d_out, d_in ≥ 2, P_out[:h] G P_in[:h']ᵀ and P_out[h:] G P_in[h':]ᵀ
    (h = d_out // 2, h' = d_in // 2), each scaled to an unbiased sketch; the dense sparse-JL
    block's first nnz // 2 count sketches and the rest, likewise."""
    named = dict(kron.model.named_parameters())
    starts = np.cumsum([0] + [p.numel() for p in named.values()])
    where = {n: (int(s), int(s) + p.numel()) for n, p, s in zip(named, named.values(), starts)}
    x = torch.from_numpy(flat).double()
    a_parts, b_parts = [], []
    for plan in kron.plan:
        if plan.route != "kronecker" or min(plan.d_out, plan.d_in) < 2:
            continue
        module = kron.model.get_submodule(plan.name.rsplit(".", 1)[0])
        layer = kron._layers[module]
        p_out, p_in = layer["p_out"].double(), layer["p_in"].reshape(plan.d_in, -1).double()
        lo, hi = where[plan.name]
        g = x[:, lo:hi].reshape(len(x), plan.shape[0], -1)  # [N, out, in·kh·kw]
        h, h2, full = plan.d_out // 2, plan.d_in // 2, plan.d_out * plan.d_in
        a_parts.append((p_out[:h] @ g @ p_in[:h2].T).flatten(1) * math.sqrt(full / (h * h2)))
        rest = (plan.d_out - h) * (plan.d_in - h2)
        b_parts.append((p_out[h:] @ g @ p_in[h2:].T).flatten(1) * math.sqrt(full / rest))
    dense = [p.name for p in kron.plan if p.route == "dense"]
    cols = torch.cat([x[:, where[n][0] : where[n][1]] for n in dense], 1).float()
    projected = kron._dense_proj.project(cols).double()  # [N, d_dense]
    d, nnz = projected.shape[1], kron._dense_proj.nnz
    split = sum(d // nnz + (j < d % nnz) for j in range(nnz // 2))  # its first count sketches
    a_parts.append(projected[:, :split] * math.sqrt(nnz / (nnz // 2)))
    b_parts.append(projected[:, split:] * math.sqrt(nnz / (nnz - nnz // 2)))
    return torch.cat(a_parts, 1).numpy(), torch.cat(b_parts, 1).numpy()


def _scores(blocks: list[np.ndarray], method: str) -> np.ndarray:
    """Σ_c w_c ⟨·,·⟩ (TracIn, blocks carrying √w_c) or Σ_c w_c cos (ReTrac): [S, S]."""
    total = 0.0
    for w, b in zip(WEIGHTS, blocks):
        if method == "retrac":
            b = math.sqrt(w) * b / np.linalg.norm(b, axis=1, keepdims=True)
        total = total + b @ b.T
    return total


def _mean_spearman(x: np.ndarray, y: np.ndarray) -> float:
    off = ~np.eye(len(x), dtype=bool)
    n = len(x)
    pairs = zip(x[off].reshape(n, n - 1), y[off].reshape(n, n - 1))
    return float(np.mean([spearmanr(a, b)[0] for a, b in pairs]))


def _q_from_halves(rho: float, d: int, d_a: int, d_b: int) -> float:
    """(1 + q·d/d_A)(1 + q·d/d_B) = 1/rho², solved by bisection (not the closed form)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 + mid * d / d_a) * (1 + mid * d / d_b) < 1 / rho**2 else (lo, mid)
    return lo


def test_kronecker_halves_are_the_factors_quarter_blocks_of_autograd_gradients(
    tmp_path, monkeypatch
):
    """Without room for exact scores, a Kronecker build's record is the agreement of the two
    halves, each equal to its quarter blocks of P_out ⊗ P_in (and its share of the dense map)
    applied to full-space gradients of a plain per-sample autograd loop."""
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
    imgs, models = _images(9), [tiny_unet(s) for s in (1, 2)]
    spec = gi.BuildSpec(
        projection="kronecker", proj_dim=512, timesteps=2, batch_size=4,
        checkpoint_weights=WEIGHTS, seed=3,
    )  # fmt: skip
    idx = _build(tmp_path / "idx", models, imgs, spec, 7)
    fid = idx.info()["fidelity"]
    assert fid["reference"].startswith("split-half estimate")
    rows = np.asarray(fid["rows"])
    x0 = torch.from_numpy(imgs[rows]) * 2 - 1
    T, U, _ = reference_rows(models, scheduler(), x0, [{}] * 7, idx.spec, WEIGHTS)  # [7, 2p]
    p = T.shape[1] // 2
    halves = {m: ([], []) for m in ("tracin", "retrac")}
    names = [n for n, _ in models[0].named_parameters()]
    for c, model in enumerate(models):
        seed = projection_seed(idx.spec.proj_seed, c)
        kron = KroneckerGradients(model, names, item_loss_fn("mse"), 512, seed)
        assert any(min(pl.d_out, pl.d_in) == 1 for pl in kron.plan if pl.route == "kronecker")
        for m, full in (("tracin", T), ("retrac", U)):
            a, b = _half_features(kron, full[:, c * p : (c + 1) * p])
            halves[m][0].append(a)
            halves[m][1].append(b)
    assert fid["halves"]["d_a"] == a.shape[1] and fid["halves"]["d_b"] == b.shape[1]
    assert fid["halves"]["of"] == 512 and "d_out or d_in = 1" in fid["halves"]["left_out"]
    for m in ("tracin", "retrac"):
        rho = _mean_spearman(_scores(halves[m][0], m), _scores(halves[m][1], m))
        assert fid[m]["spearman_between_halves"] == pytest.approx(rho, abs=1e-9), m
        q = _q_from_halves(rho, 512, a.shape[1], b.shape[1])
        assert fid[m]["spearman"] == pytest.approx(1 / math.sqrt(1 + q), abs=1e-6)


def test_a_kronecker_build_does_not_featurize_its_sample_again(tmp_path, monkeypatch):
    """A sample of over 10% of the rows, exact scores not fitting: the halves' estimate, and
    the gradients are computed once per batch and checkpoint, by the build only."""
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
    calls = []
    featurize = GradientFeaturizer.featurize

    def counted(self, *args, **kwargs):
        calls.append(len(args[0]))
        return featurize(self, *args, **kwargs)

    monkeypatch.setattr(GradientFeaturizer, "featurize", counted)
    spec = gi.BuildSpec(projection="kronecker", proj_dim=256, timesteps=2, batch_size=5)
    idx = _build(tmp_path / "idx", [tiny_unet(1)], _images(10), spec, 4)
    assert idx.info()["fidelity"]["reference"].startswith("split-half estimate")
    assert calls == [5, 5]  # the build's two batches, nothing for the fidelity check


@pytest.mark.parametrize(("d", "d_a", "d_b"), [(60, 30, 30), (60, 20, 40), (512, 120, 118)])
@pytest.mark.parametrize("rho", [0.05, 0.5, 0.93])
def test_noise_from_unequal_halves_solves_the_documented_equation(d, d_a, d_b, rho):
    """Halves of unequal width that together keep fewer than d columns (Kronecker)."""
    assert noise_from_halves(rho, d, d_a, d_b) == pytest.approx(
        _q_from_halves(rho, d, d_a, d_b), rel=1e-6
    )


def test_each_kronecker_half_is_an_unbiased_sketch_on_its_own():
    """A column of P_out ⊗ P_in (d_out × d_in Gaussian) carries ‖g‖² / (d_out·d_in) in
    expectation, so a half keeping c of a layer's columns needs scale² = d_out·d_in / c; a half
    of the dense sparse JL block keeping k of its nnz count sketches needs nnz / k. Layers with
    odd d_out (13 = 6 + 7) make the two halves' scales differ. Worked out by hand for
    test_kronecker_layout's model in the 'kronecker' layout at d = 1,050 (test_kronecker_layout
    pins those shapes): its dense block has 1050 - 856 = 194 columns, sketches of 49, 49, 48, 48."""
    from gradindex.featurize.halves import _kronecker_halves
    from tests.featurize.test_kronecker_layout import _hand_model, _kron

    parts_a, parts_b, left_out = _kronecker_halves(_kron(_hand_model(), 1050, nnz=4), 4)
    got = [[(len(cols), round(s * s, 9)) for cols, s in part] for part in (parts_a, parts_b)]
    layers = [(182, 6 * 7, 7 * 7), (180, 5 * 9, 5 * 9), (130, 6 * 5, 7 * 5)] + [(182, 42, 49)] * 2
    assert got[0] == [(a, round(full / a, 9)) for full, a, _ in layers] + [(98, 2.0)]
    assert got[1] == [(b, round(full / b, 9)) for full, _, b in layers] + [(96, 2.0)]
    assert not left_out
    # nnz above the dense block's 194 columns: its map has 194 one-column sketches, split 97 / 97
    parts_a, parts_b, _ = _kronecker_halves(_kron(_hand_model(), 1050, nnz=200), 200)
    assert (len(parts_a[-1][0]), len(parts_b[-1][0])) == (97, 97)


def test_a_kronecker_map_with_no_part_that_splits_measures_against_a_second_sketch(
    tmp_path, monkeypatch
):
    """proj_dim 64 over the tiny UNet's 51 factored layers: 8 dense columns, then 56 // 51 = 1
    output per layer (1 × 1 factors: none splits), and a dense map of one count sketch
    (sjlt_nnz = 1): no halves, so the record is a second sketch's."""
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
    spec = gi.BuildSpec(projection="kronecker", proj_dim=64, sjlt_nnz=1, timesteps=1)
    idx = _build(tmp_path / "idx", [tiny_unet(1)], _images(6), spec, 4)
    fid = idx.info()["fidelity"]
    assert fid["reference"] == "second sketch (estimate)" and "halves" not in fid
