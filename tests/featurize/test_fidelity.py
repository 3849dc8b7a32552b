"""Each build measures how closely its stored rows rank like exact scores (gradindex.featurize.fidelity):
the recorded figures against an independent autograd loop and scipy, the warning with its
suggested --proj-dim, ``info``, and indexes built before the measurement existed."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr

import gradindex as gi
import gradindex.featurize.fidelity
from gradindex.cli.main import main
from gradindex.errors import SpecError
from gradindex.featurize.embedding import projection_seed
from gradindex.featurize.fidelity import _second_seed
from gradindex.featurize.projection import make_projector
from gradindex.store.layout import MANIFEST
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows

WEIGHTS = (1.0, 2.0)
NUM_CLASSES = 3


def _images(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _build(tmp_path, models, imgs, spec, **kwargs):
    sched = scheduler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idx = gi.build_index(
            checkpoints=[(m, sched) for m in models],
            data=imgs,
            out=tmp_path / "idx",
            spec=spec,
            progress=False,
            **kwargs,
        )
    return idx, [str(w.message) for w in caught if "fidelity" in str(w.message)]


def _off_diagonal(m: np.ndarray) -> np.ndarray:
    n = len(m)
    return m[~np.eye(n, dtype=bool)].reshape(n, n - 1)


def _expected(reference: np.ndarray, served: np.ndarray, k: int) -> tuple[list, list]:
    """Per query (each sampled row against the others): scipy's Spearman and the top-k overlap."""
    ref, got = _off_diagonal(reference), _off_diagonal(served)
    rho = [spearmanr(a, b)[0] for a, b in zip(ref, got)]
    overlap = [len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k for a, b in zip(ref, got)]
    return rho, overlap


@pytest.mark.parametrize("case", ["exact", "second sketch", "class-conditional"])
def test_recorded_fidelity_equals_independent_computation(tmp_path, monkeypatch, case):
    """The build samples 7 of 9 rows; its figures equal those computed here from full-space
    rows of a plain per-sample autograd loop (and, without room for full-space rows, from a
    second sketch with the documented seed) against the stored rows."""
    imgs = _images(9)
    cond = case == "class-conditional"
    models = [tiny_unet(s, num_class_embeds=NUM_CLASSES) if cond else tiny_unet(s) for s in (1, 2)]
    labels = np.arange(9) % NUM_CLASSES if cond else None
    nnz = 4
    if case == "second sketch":  # an sjlt map of one count sketch does not split in halves
        monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
        nnz = 1
    spec = gi.BuildSpec(
        proj_dim=64, timesteps=2, batch_size=4, checkpoint_weights=WEIGHTS, seed=3, sjlt_nnz=nnz
    )
    idx, _ = _build(tmp_path, models, imgs, spec, labels=labels, fidelity_sample=7)
    fid = json.loads((tmp_path / "idx" / MANIFEST).read_text())["fidelity"]
    rows = np.asarray(fid["rows"])
    assert len(set(rows.tolist())) == 7 and rows.min() >= 0 and rows.max() < 9
    assert fid["sample"] == 7 and fid["k"] == 3 and fid["proj_dim"] == 64

    x0 = torch.from_numpy(imgs[rows]) * 2 - 1
    conds = [{"class_labels": torch.tensor([int(labels[i])])} for i in rows] if cond else [{}] * 7
    T, U, _ = reference_rows(models, scheduler(), x0, conds, idx.spec, WEIGHTS)  # [7, 2p]
    if case == "second sketch":  # each checkpoint's block through an independent sjlt map
        p = T.shape[1] // 2
        reference = {"tracin": 0.0, "retrac": 0.0}
        for c, w in enumerate(WEIGHTS):
            seed = _second_seed(idx.spec.proj_seed, c)
            assert seed != projection_seed(idx.spec.proj_seed, c)
            proj = make_projector("sjlt", p, 64, seed, nnz=1)
            a = proj.project(torch.from_numpy(T[:, c * p : (c + 1) * p]).float()).double().numpy()
            r = proj.project(torch.from_numpy(U[:, c * p : (c + 1) * p]).float()).double().numpy()
            r /= np.linalg.norm(r, axis=1, keepdims=True)
            reference["tracin"] = reference["tracin"] + a @ a.T  # (√w a)(√w a)ᵀ = w a aᵀ
            reference["retrac"] = reference["retrac"] + w * r @ r.T
        assert fid["reference"] == "second sketch (estimate)"
    else:
        reference = {"tracin": T @ T.T, "retrac": U @ U.T}  # Σ w ⟨a, a'⟩, Σ w cos(r, r')
        assert fid["reference"] == "exact"
    for m in ("tracin", "retrac"):
        stored = idx.vectors(m)[rows].astype(np.float64)
        rho, overlap = _expected(reference[m], stored @ stored.T, 3)
        got = fid[m]
        if case == "second sketch":  # corr with exact = √(corr between the two sketches)
            assert got["spearman_between_sketches"] == pytest.approx(np.mean(rho), abs=1e-9)
            assert got["spearman"] == pytest.approx(math.sqrt(max(np.mean(rho), 0)), abs=1e-9)
        else:
            assert got["spearman"] == pytest.approx(np.mean(rho), abs=1e-9)
            assert got["spearman_min"] == pytest.approx(np.min(rho), abs=1e-9)
        assert got["topk"] == pytest.approx(np.mean(overlap), abs=1e-9)
        assert got["topk_min"] == pytest.approx(np.min(overlap), abs=1e-9)


def _q_from_halves(rho: float, d: int, d_a: int) -> float:
    """(1 + q·d/d_A)(1 + q·d/d_B) = 1/rho², solved by bisection (independent of the closed form)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if (1 + mid * d / d_a) * (1 + mid * d / (d - d_a)) < 1 / rho**2:
            lo = mid
        else:
            hi = mid
    return lo


@pytest.mark.parametrize(
    ("projection", "nnz"),
    [("sjlt", 4), ("sjlt", 3), ("sjlt", 2), ("gaussian", 1), ("kronecker-sjlt", 4)],
)
def test_without_room_for_exact_scores_the_stored_halves_estimate_fidelity(
    tmp_path, monkeypatch, projection, nnz
):
    """No second featurizing (the reference gradients are never computed): the record is the
    agreement of the stored rows' two independent column groups, turned into 1/√(1 + q)."""
    imgs, models = _images(9), [tiny_unet(s) for s in (1, 2)]
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the halves' estimate featurized the sample again")

    monkeypatch.setattr(gradindex.featurize.fidelity, "_reference_scores", no_second_pass)
    spec = gi.BuildSpec(
        proj_dim=60, projection=projection, sjlt_nnz=nnz, timesteps=2, batch_size=4,
        checkpoint_weights=WEIGHTS, seed=3,
    )  # fmt: skip
    idx, _ = _build(tmp_path, models, imgs, spec, fidelity_sample=7)
    fid = idx.info()["fidelity"]
    assert fid["reference"].startswith("split-half estimate")
    rows = np.asarray(fid["rows"])
    # the map's independent column groups: sjlt's first nnz // 2 count sketches (d split in nnz
    # blocks of sizes differing by at most one; kronecker-sjlt: its final map's), half a
    # Gaussian map's columns
    d_a = {"sjlt": 60 // nnz * (nnz // 2), "gaussian": 30, "kronecker-sjlt": 30}[projection]
    for m in ("tracin", "retrac"):
        x = idx.vectors(m)[rows].astype(np.float64)
        half = []
        for cols in (slice(0, d_a), slice(d_a, 60)):
            total = 0.0
            for c, w in enumerate(WEIGHTS):
                b = x[:, c * 60 : (c + 1) * 60][:, cols]
                if m == "retrac":  # Σ_c w_c cos
                    b = math.sqrt(w) * b / np.linalg.norm(b, axis=1, keepdims=True)
                total = total + b @ b.T
            half.append(total)
        rho, overlap = _expected(half[0], half[1], 3)
        got = fid[m]
        assert got["spearman_between_halves"] == pytest.approx(np.mean(rho), abs=1e-9)
        if np.mean(rho) > 0:
            q = _q_from_halves(np.mean(rho), 60, d_a)
            assert got["spearman"] == pytest.approx(1 / math.sqrt(1 + q), abs=1e-6)
        else:  # halves that do not agree at all: the sketch carries no rank information
            assert got["spearman"] < 2e-3
        assert got["topk"] == pytest.approx(np.mean(overlap), abs=1e-9)


def test_halves_estimate_tracks_the_exact_fidelity(tmp_path, monkeypatch):
    """The estimate measures the same thing: on a model whose exact scores fit, the halves'
    Spearman lands near the exact one (at a d where the sketch is good; at small d it errs
    low, as documented)."""
    imgs, models = _images(24, seed=7), [tiny_unet(1)]
    spec = gi.BuildSpec(proj_dim=1024, timesteps=2, batch_size=8, seed=1)
    idx, _ = _build(tmp_path / "exact", models, imgs, spec)
    exact = idx.info()["fidelity"]
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
    idx, _ = _build(tmp_path / "halves", models, imgs, spec)
    est = idx.info()["fidelity"]
    assert exact["reference"] == "exact" and est["rows"] == exact["rows"]
    assert est["reference"].startswith("split-half")
    for m in ("tracin", "retrac"):
        assert est[m]["spearman"] == pytest.approx(exact[m]["spearman"], abs=0.06), m


def test_a_large_build_measures_against_a_second_sketch(tmp_path, monkeypatch):
    """When the sample is at most 10% of the rows, featurizing it again is cheap enough for the
    more accurate second sketch."""
    imgs, models = _images(40, seed=2), [tiny_unet(1)]
    monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
    spec = gi.BuildSpec(proj_dim=64, timesteps=1, batch_size=20)
    idx, _ = _build(tmp_path, models, imgs, spec, fidelity_sample=4)
    assert idx.info()["fidelity"]["reference"] == "second sketch (estimate)"
    idx, _ = _build(tmp_path / "more", models, imgs, spec, fidelity_sample=5)
    assert idx.info()["fidelity"]["reference"].startswith("split-half")


def test_tiny_proj_dim_warns_with_a_larger_one_and_a_large_one_does_not(tmp_path):
    imgs, models = _images(12, seed=5), [tiny_unet(1)]
    spec = gi.BuildSpec(proj_dim=4, timesteps=2, batch_size=6)
    idx, caught = _build(tmp_path / "small", models, imgs, spec)
    fid = idx.info()["fidelity"]
    assert not fid["ok"] and fid["sample"] == 12  # default sample: every row of a small build
    worst = min(fid[m]["spearman"] for m in ("tracin", "retrac"))
    assert worst < gradindex.featurize.fidelity.FIDELITY_BAR["spearman"]
    # the documented rule: d·q(ρ)/q(bar), q = 1/ρ² - 1, at least 2d, up to a power of two
    want = max(8, 4 * (1 / worst**2 - 1) / (1 / 0.95**2 - 1))
    assert fid["suggested_proj_dim"] == 2 ** math.ceil(math.log2(want))
    assert len(caught) == 1 and f"--proj-dim {fid['suggested_proj_dim']}" in caught[0]

    spec = spec.replace(proj_dim=16384)
    idx, caught = _build(tmp_path / "large", models, imgs, spec)
    fid = idx.info()["fidelity"]
    assert fid["ok"] and fid["suggested_proj_dim"] is None and caught == []
    assert all(fid[m]["spearman"] >= 0.95 and fid[m]["topk"] >= 0.8 for m in ("tracin", "retrac"))


def test_info_shows_fidelity_and_an_old_index_still_opens(tmp_path):
    imgs, models = _images(8), [tiny_unet(1)]
    idx, _ = _build(tmp_path, models, imgs, gi.BuildSpec(proj_dim=32, timesteps=2))
    fid = idx.info()["fidelity"]
    res = CliRunner().invoke(main, ["info", str(idx.path)])
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("fidelity")]
    assert len(line) == 1
    for m in ("tracin", "retrac"):
        assert f"{m} Spearman {fid[m]['spearman']:.3f}" in line[0]
    res = CliRunner().invoke(main, ["info", str(idx.path), "--json"])
    assert json.loads(res.output)["fidelity"] == fid

    path = idx.path / MANIFEST  # an index from before the measurement: no "fidelity" key
    manifest = json.loads(path.read_text())
    del manifest["fidelity"]
    path.write_text(json.dumps(manifest))
    old = gi.AttributionIndex.open(idx.path, checkpoints=[(models[0], scheduler())])
    assert old.info()["fidelity"] is None
    assert len(old.query(imgs[:1], k=2).ids[0]) == 2
    res = CliRunner().invoke(main, ["info", str(idx.path)])
    assert res.exit_code == 0, res.output
    assert not [ln for ln in res.output.splitlines() if ln.startswith("fidelity")]


def test_skipped_for_identity_and_zero_sample(tmp_path):
    imgs, models = _images(6), [tiny_unet(1)]
    spec = gi.BuildSpec(projection="identity", timesteps=2)
    idx, caught = _build(tmp_path / "identity", models, imgs, spec)
    assert "exact" in idx.info()["fidelity"]["skipped"] and caught == []
    spec = gi.BuildSpec(proj_dim=4, timesteps=2)  # would warn if measured
    idx, caught = _build(tmp_path / "zero", models, imgs, spec, fidelity_sample=0)
    assert idx.info()["fidelity"] == {"skipped": "fidelity_sample=0"} and caught == []


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_bad_fidelity_sample_is_refused_before_anything_is_written(tmp_path, bad):
    with pytest.raises(SpecError, match="fidelity_sample"):
        _build(tmp_path, [tiny_unet(1)], _images(4), gi.BuildSpec(timesteps=2), fidelity_sample=bad)
    assert not (tmp_path / "idx").exists()


def test_cli_build_fidelity_sample(tmp_path, saved_checkpoints):
    data = tmp_path / "train.npy"
    np.save(data, _images(6))
    ckpt = [a for c in saved_checkpoints for a in ("-c", str(c))]
    args = ["build", *ckpt, "--data", str(data), "--proj-dim", "16", "--timesteps", "2"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--fidelity-sample", "0"])
    assert res.exit_code == 0, res.output
    assert "fidelity     not measured (fidelity_sample=0)" in res.output
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--fidelity-sample", "-1"])
    assert res.exit_code == 2 and "--fidelity-sample" in res.output
    assert not (tmp_path / "b").exists()


def test_a_sketch_wider_than_the_model_is_not_suggested():
    """When the d that would reach the bar is at least the parameter count, the warning says to
    build exact rows (--projection identity) instead of naming an absurd --proj-dim."""
    from gradindex.featurize.fidelity import _warning

    row = {"spearman": 0.5, "topk": 0.5}
    record = {"k": 3, "bar": {"spearman": 0.95, "topk": 0.8}, "reference": "exact", "sample": 7,
              "tracin": row, "retrac": row, "suggested_proj_dim": 1 << 29}  # fmt: skip
    wide = _warning(record, "sjlt", num_params=1000)
    assert wide.endswith(
        "rebuild with --projection identity (exact: a sketch would need a --proj-dim of at least "
        "the model's 1000 parameters)"
    )
    assert "rebuild with --proj-dim" not in wide and str(1 << 29) not in wide  # no absurd d
    narrow = _warning(record, "sjlt", num_params=1 << 30)
    assert narrow.endswith(f"rebuild with --proj-dim {1 << 29}")
    assert "identity" not in _warning(record, "kronecker", num_params=1000)


@pytest.mark.parametrize("reference", ["exact", "second sketch"])
def test_a_streamed_build_measures_its_fidelity_like_a_full_one(tmp_path, monkeypatch, reference):
    """The streamed path's featurizers return projected rows: the reference must still be full
    space (or a second map), not those rows again (which would read as perfect fidelity)."""
    imgs, models = _images(40, seed=2), [tiny_unet(1)]
    if reference == "second sketch":
        monkeypatch.setattr(gradindex.featurize.fidelity, "FULL_SPACE_BUDGET", 0)
    spec = gi.BuildSpec(proj_dim=16, timesteps=2, batch_size=20)
    got = {}
    for path in ("full", "streamed"):
        idx, _ = _build(tmp_path / path, models, imgs, spec, fidelity_sample=4,
                        featurize_path=path)  # fmt: skip
        assert idx.manifest["featurize"]["path"] == path
        got[path] = idx.info()["fidelity"]
    assert got["streamed"]["reference"] == got["full"]["reference"]
    assert got["full"]["reference"] == {"exact": "exact"}.get(reference, "second sketch (estimate)")
    for m in ("tracin", "retrac"):
        assert got["streamed"][m]["spearman"] == pytest.approx(got["full"][m]["spearman"], abs=1e-3)
        assert got["full"][m]["spearman"] < 0.999  # d = 16: far from exact
