"""Method 'influence' (EK-FAC): factors against per-item autograd, index scores against a
dense solve from the same factors, and the refusals (stale, missing, bad input)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradindex as gi
from gradindex.cli.main import main
from gradindex.errors import IndexStateError, SearchError, SpecError
from gradindex.featurize.gradients import GradientFeaturizer
from gradindex.featurize.kfac import FactorEstimator, estimate_factors, factorable, ggn_loss
from gradindex.query_influence import add_factors, embed_influence
from gradindex.store.layout import FACTORS, MANIFEST
from tests.conftest import scheduler, tiny_unet


def _spec(**kw):
    base = dict(
        proj_dim=64, projection="identity", timesteps=2, noise_draws=1,
        data_range=(0.0, 1.0), batch_size=4,
    )  # fmt: skip
    return gi.BuildSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpts = [(tiny_unet(1), scheduler()), (tiny_unet(2), scheduler())]
    rng = np.random.default_rng(0)
    train = rng.random((6, 1, 8, 8), dtype=np.float32)
    out = tmp_path_factory.mktemp("inf") / "idx"
    idx = gi.build_index(
        checkpoints=ckpts, data=train, out=out, spec=_spec(), overwrite=True, progress=False
    )
    add_factors(idx, train, seed=3)
    return ckpts, train, out


def _reference_factors(model, est, x0, seed):
    """A, S, per-item gradients by plain autograd, one item at a time (no gradindex hooks)."""
    x_t, t, xi = est._draws(torch.as_tensor(x0), seed)
    mods = dict(model.named_modules())
    layers = {lay.name: mods[lay.name.rsplit(".", 1)[0]] for lay in est.layers}
    acts, outs = {}, {}

    def keep(name):
        def hook(module, args, output):
            acts[name] = args[0].detach()
            output.retain_grad()
            outs[name] = output

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    A = {n: 0.0 for n in layers}
    S = {n: 0.0 for n in layers}
    grads = []
    try:
        for i in range(len(x_t)):
            model.zero_grad()
            out = model(x_t[i : i + 1], t[i : i + 1]).sample
            ggn_loss(out, xi[i : i + 1]).sum().backward()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            for n, m in layers.items():
                a, d = acts[n], outs[n].grad
                if isinstance(m, torch.nn.Conv2d):
                    cols = torch.nn.functional.unfold(
                        a, m.kernel_size, m.dilation, m.padding, m.stride
                    )[0]  # [in·kh·kw, L]
                    dd = d[0].reshape(d.shape[1], -1)  # [out, L]
                else:
                    cols = a.reshape(-1, a.shape[-1]).T
                    dd = d.reshape(-1, d.shape[-1]).T
                A[n] = A[n] + (cols.double() @ cols.double().T) / cols.shape[1]
                S[n] = S[n] + dd.double() @ dd.double().T
    finally:
        for h in handles:
            h.remove()
    n = len(x_t)
    return {k: v / n for k, v in A.items()}, {k: v / n for k, v in S.items()}, grads


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding of the batched vs one-item forward passes."""
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-30


def test_factors_equal_per_item_autograd_on_a_tiny_model():
    model = tiny_unet(5)
    ck = gi.inputs.models.load_checkpoints([(model, scheduler())])[0]
    feat = GradientFeaturizer(ck, _spec())
    x0 = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = estimate_factors(feat, [(x0, None)], seed=7)
    est = FactorEstimator(feat)
    A, S, grads = _reference_factors(feat.model, est, x0, 7 * 1_000_003)
    assert {lay.name for lay in f.layers} == set(A)
    kinds = {type(est.modules[lay.name]) for lay in est.layers}
    assert kinds == {torch.nn.Linear, torch.nn.Conv2d}
    for lay in f.layers:
        _close(lay.A, A[lay.name])
        _close(lay.S, S[lay.name])
        g = torch.stack([gr[lay.name].double().reshape(lay.shape) for gr in grads])
        _close(lay.eig, ((lay.QS.T @ g @ lay.QA) ** 2).mean(0))
    # the diagonal as one vector: a bias right before a GroupNorm has a gradient at rounding level
    names = list(f.diag_slices)
    g = torch.stack([torch.cat([gr[n].double().reshape(-1) for n in names]) for gr in grads])
    got = torch.cat([f.diag[a:b] for a, b in f.diag_slices.values()])
    _close(got, (g**2).mean(0))
    assert len(names) > 0 and got.max() > 0
    assert all(not factorable(est.modules.get(n, torch.nn.GroupNorm(1, 1))) for n in f.diag_slices)


def _dense_influence(folder, rows_q, rows_z, weights, damping=0.1):
    """Σ_c w_c g_c(q)ᵀ (H_c + λ)⁻¹ g_c(z) with H_c formed densely from factors.h5 (a
    p_l × p_l matrix per factored layer, a diagonal elsewhere) and solved by numpy."""
    total = np.zeros((len(rows_q), len(rows_z)))
    p = rows_q.shape[1] // len(weights)
    with h5py.File(folder / FACTORS, "r") as f:
        for c, w in enumerate(weights):
            g = f[f"c{c}"]
            gq = rows_q[:, c * p : (c + 1) * p].astype(np.float64) / np.sqrt(w)
            gz = rows_z[:, c * p : (c + 1) * p].astype(np.float64) / np.sqrt(w)
            for name in json.loads(g.attrs["layers"]):
                lg = g[name.replace(".", "/")]
                a, b = lg.attrs["cols"]
                kron = np.kron(lg["QS"][()], lg["QA"][()])
                eig = lg["eig"][()].reshape(-1)
                H = kron @ np.diag(eig) @ kron.T + damping * eig.mean() * np.eye(b - a)
                total += w * gq[:, a:b] @ np.linalg.solve(H, gz[:, a:b].T)
            diag = g["diag"][()]
            for a, b in json.loads(g["diag"].attrs["slices"]).values():
                d = diag[a:b] + damping * diag[a:b].mean()
                total += w * (gq[:, a:b] / d) @ gz[:, a:b].T
    return total


def test_index_scores_equal_dense_solve_from_the_factors(setup):
    ckpts, train, out = setup
    idx = gi.AttributionIndex.open(out, checkpoints=ckpts)
    q = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    res = idx.query(q, k=len(train), method="influence", exact=True)
    got = np.empty(res.scores.shape)
    np.put_along_axis(got, res.rows, res.scores, axis=1)
    weights = [float(c["weight"]) for c in idx.manifest["checkpoints"]]
    want = _dense_influence(out, idx.embed(q)["tracin"], idx.vectors("tracin"), weights)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    # and the damping moves the scores: a query is not TracIn with another name
    tracin = idx.search(idx.embed(q)["tracin"], k=len(train), method="tracin", exact=True)
    assert not np.allclose(np.sort(res.scores), np.sort(tracin.scores), rtol=1e-2)


def test_damping_override_equals_dense_at_that_damping(setup):
    ckpts, train, out = setup
    idx = gi.AttributionIndex.open(out, checkpoints=ckpts)
    q = np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)
    rows = embed_influence(idx, q, damping=1.0)
    got = rows @ idx.vectors("tracin").T
    weights = [float(c["weight"]) for c in idx.manifest["checkpoints"]]
    want = _dense_influence(out, idx.embed(q)["tracin"], idx.vectors("tracin"), weights, 1.0)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


@pytest.mark.parametrize("damping", [0, -1.0, float("nan"), "x"])
def test_bad_damping_is_refused(setup, damping):
    ckpts, _, out = setup
    idx = gi.AttributionIndex.open(out, checkpoints=ckpts)
    with pytest.raises(SpecError, match="damping"):
        idx.query(np.zeros((1, 1, 8, 8), np.float32), k=2, method="influence", lam=damping)


def test_lambda_on_influence_rows_in_search_is_refused(setup):
    ckpts, _, out = setup
    idx = gi.AttributionIndex.open(out, checkpoints=ckpts)
    with pytest.raises(SearchError, match="lambda applies to 'trak' / 'retrak' only"):
        idx.search(np.zeros(idx.dim, np.float32), k=2, method="influence", lam=1.0)


def test_missing_and_stale_factors_are_refused_naming_the_command(setup, tmp_path):
    import shutil

    ckpts, train, out = setup
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with h5py.File(copy / FACTORS, "a") as f:  # same length: the file keeps its size
        f.attrs["build_id"] = "0" * len(f.attrs["build_id"])
    idx = gi.AttributionIndex.open(copy, checkpoints=ckpts)
    with pytest.raises(IndexStateError, match="another build.*gradindex factors"):
        idx.query(train[:1], k=2, method="influence")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest.pop("factors")
    manifest["files"].pop(FACTORS)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    (copy / FACTORS).unlink()
    idx = gi.AttributionIndex.open(copy, checkpoints=ckpts)
    with pytest.raises(IndexStateError, match="no influence factors.*gradindex factors"):
        idx.query(train[:1], k=2, method="influence")


def test_factors_with_a_flipped_byte_are_refused_naming_the_command(setup, tmp_path):
    """Session 14 probe: a byte flipped inside factors.h5 (size unchanged) changed the
    influence scores without a word; now the query is refused naming 'gradindex factors'."""
    import shutil

    ckpts, train, out = setup
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with h5py.File(copy / FACTORS, "r") as f:
        found = []
        f.visititems(lambda n, o: found.append(o.id.get_offset()) if n.endswith("/A") else None)
    data = bytearray((copy / FACTORS).read_bytes())
    data[found[0] + 7] ^= 0x40  # the first float64's exponent
    (copy / FACTORS).write_bytes(bytes(data))
    idx = gi.AttributionIndex.open(copy, checkpoints=ckpts)
    with pytest.raises(IndexStateError, match="factors.h5: its checksum .*gradindex factors"):
        idx.query(train[:1], k=2, method="influence")


def test_truncated_factors_name_the_factors_command_and_spare_other_methods(setup, tmp_path):
    """Session 14 probe: a truncated factors.h5 refused opening the index ('rebuild the index'),
    so even tracin stopped. Now tracin answers and influence names 'gradindex factors'."""
    import shutil

    ckpts, train, out = setup
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = (copy / FACTORS).read_bytes()
    (copy / FACTORS).write_bytes(data[: len(data) // 2])
    idx = gi.AttributionIndex.open(copy, checkpoints=ckpts)
    want = gi.AttributionIndex.open(out, checkpoints=ckpts).query(train[:2], k=3, method="tracin")
    np.testing.assert_array_equal(idx.query(train[:2], k=3, method="tracin").rows, want.rows)
    with pytest.raises(IndexStateError, match="truncated.*gradindex factors") as err:
        idx.query(train[:1], k=2, method="influence")
    assert "rebuild" not in str(err.value)


def test_kronecker_index_is_refused(tmp_path):
    ckpts = [(tiny_unet(1), scheduler())]
    train = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    idx = gi.build_index(
        checkpoints=ckpts, data=train, out=tmp_path / "k", overwrite=True, progress=False,
        spec=_spec(projection="kronecker", proj_dim=256),
    )  # fmt: skip
    with pytest.raises(SearchError, match="kronecker"):
        add_factors(idx, train)


def test_cli_factors_then_query_influence(tmp_path):
    ckpts = [tmp_path / "c1"]
    tiny_unet(1).save_pretrained(ckpts[0] / "unet")
    scheduler().save_pretrained(ckpts[0] / "scheduler")
    train = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "train.npy", train)
    out = tmp_path / "idx"
    gi.build_index(
        checkpoints=[str(c) for c in ckpts], data=train, out=out, spec=_spec(), progress=False
    )
    run = CliRunner().invoke
    r = run(main, ["info", str(out)])
    assert "factors      none; add them for --method influence with: gradindex factors" in r.output
    r = run(main, ["query", str(out), str(tmp_path / "train.npy"), "--method", "influence"])
    assert r.exit_code != 0 and "gradindex factors" in r.output and "Traceback" not in r.output
    r = run(main, ["factors", str(out), "--data", str(tmp_path / "train.npy")])
    assert r.exit_code == 0, r.output
    assert "K-FAC layers" in r.output
    r = run(
        main,
        ["query", str(out), str(tmp_path / "train.npy"), "--method", "influence", "--json"],
    )
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert len(recs) == 5 and all(rec["method"] == "influence" for rec in recs)
    r = run(main, ["info", str(out), "--verify"])  # factors.h5 is checksummed in the manifest
    assert r.exit_code == 0, r.output
    assert "factors      EK-FAC" in r.output and "(--method influence)" in r.output
    # a .npy of query rows is one set of rows (embed()'s): influence would search them as they
    # are, i.e. answer TracIn in silence; refused, pointing at its own rows or images
    emb = gi.AttributionIndex.open(out).embed(train[:2])["tracin"]
    np.save(tmp_path / "rows.npy", emb)
    r = run(
        main, ["query", str(out), str(tmp_path / "rows.npy"), "--vectors", "--method", "influence"]
    )
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "needs its own query rows" in lines[0], r.output


@pytest.mark.filterwarnings("ignore:projection fidelity is below the bar")
def test_adam_preconditioned_index_is_refused(tmp_path):
    """Its rows are Adam-scaled gradients, not the plain ones the EK-FAC solve assumes."""
    from tests.featurize.test_precondition import adam_run

    train = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    folders, _, _ = adam_run(tmp_path / "run", train, seeds=(1,), steps=1)
    idx = gi.build_index(
        checkpoints=folders, data=train, out=tmp_path / "a", progress=False,
        spec=_spec(projection="sjlt", precondition="adam"),
    )  # fmt: skip
    with pytest.raises(SearchError, match="plain gradients, not precondition='adam'"):
        add_factors(idx, train)
    assert not (tmp_path / "a" / FACTORS).exists()


@pytest.mark.parametrize("samples", [0, -2, 1.5])
def test_factor_samples_must_be_a_positive_integer(setup, samples):
    ckpts, train, out = setup
    idx = gi.AttributionIndex.open(out, checkpoints=ckpts)
    with pytest.raises(SearchError, match=f"samples={samples!r}: must be a positive integer"):
        add_factors(idx, train, samples=samples)


def test_factors_of_a_sample_then_of_all_images_serve_the_new_ones(tmp_path):
    """samples=5 with one label for all keeps that label (5 recorded); factors added again to
    the open index answer its next query (as a fresh open of the folder does), not the old;
    an influence query says when its images were resized."""
    from tests.serve_helpers import class_conditional_index

    idx, train, labels = class_conditional_index(tmp_path)
    q = train[:2]
    assert add_factors(idx, train, samples=5, seed=4, labels=1)["samples"] == 5
    first = embed_influence(idx, q, labels=[0, 1])
    assert add_factors(idx, train, labels=labels)["samples"] == len(train)
    again = embed_influence(idx, q, labels=[0, 1])
    fresh = gi.AttributionIndex.open(idx.path, checkpoints=idx._checkpoint_sources)
    np.testing.assert_allclose(again, embed_influence(fresh, q, labels=[0, 1]), rtol=1e-5)
    assert np.abs(again - first).max() > 1e-3 * np.abs(first).max()
    big = np.repeat(np.repeat(q, 2, axis=2), 2, axis=3)[:, :, :12, :12]  # 12x12: resized to 8x8
    with pytest.warns(UserWarning, match="resized from 12x12"):
        res = idx.query(big, k=3, method="influence", labels=0)
    assert res.resized == (12, 12) and res.rows.shape == (2, 3)
