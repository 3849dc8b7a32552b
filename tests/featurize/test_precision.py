"""BuildSpec(precision='bfloat16'): the model's forward/backward under bfloat16 autocast, rows
against a float64 per-sample autograd loop (close, and measurably not float32's rows) on every
path a build can take."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import gradindex as gi
from gradindex.errors import SpecError
from gradindex.featurize.embedding import Embedder, projection_seed
from gradindex.featurize.layer_grads import bmm_into, factor_dtypes
from gradindex.featurize.precision import compute_precision
from gradindex.featurize.projection import make_projector
from gradindex.inputs.models import load_checkpoints
from tests.conftest import scheduler, tiny_unet
from tests.diffusion_refs import reference_rows, use_backend

SPEC = gi.BuildSpec(proj_dim=60, timesteps=2, noise_draws=2, seed=3, num_train_timesteps=1000)
X0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _rows(path: str, precision: str) -> dict[str, np.ndarray]:
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())], None, None, "none")
    emb = Embedder(ckpts, SPEC.replace(precision=precision), path=path)
    assert emb.path == path
    e = emb.embed(X0)
    return {"tracin": e.tracin, "retrac": e.retrac, "norms": e.norms[:, 0]}


def _float64_loop() -> dict[str, np.ndarray]:
    """The loop's rows with the model and images in float64, projected by the same sjlt map."""
    model = copy.deepcopy(tiny_unet(1)).double()
    T, U, N = reference_rows([model], scheduler(), X0.double(), [{}] * len(X0), SPEC, (1.0,))
    proj = make_projector("sjlt", T.shape[1], 60, projection_seed(SPEC.proj_seed, 0), nnz=4)
    r = proj.project(torch.from_numpy(U).float()).double().numpy()
    tracin = proj.project(torch.from_numpy(T).float()).double().numpy()
    return {
        "tracin": tracin,
        "retrac": r / np.linalg.norm(r, axis=1, keepdims=True),
        "norms": N[:, 0],
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    ("path", "backend"), [("full", "hooks"), ("full", "vmap"), ("streamed", "hooks")]
)
def test_bfloat16_rows_are_close_to_a_float64_loop_but_not_float32s(path, backend, monkeypatch):
    """Per row: cosine ≥ 0.99 and relative error ≤ 0.1 against the float64 loop; float32's
    rows match the loop to 1e-4; bfloat16's differ from float32's by more than 1e-4 relative
    (autocast really ran), norms included."""
    use_backend(monkeypatch, backend)
    want = _float64_loop()
    rows32, rows16 = _rows(path, "float32"), _rows(path, "bfloat16")
    for m in ("tracin", "retrac", "norms"):
        assert _rel(rows32[m], want[m]).max() < 1e-4, m
        assert _rel(rows16[m], want[m]).max() < 0.1, m
        assert _rel(rows16[m], rows32[m]).min() > 1e-4, m
    for m in ("tracin", "retrac"):
        assert _cosine(rows16[m], want[m]).min() >= 0.99, m


def test_kronecker_rows_honour_bfloat16_too():
    """The Kronecker path (its float32 rows are tested against the loop in test_kronecker):
    bfloat16 rows within cosine 0.99 of float32's, and not equal to them."""
    spec = SPEC.replace(projection="kronecker", proj_dim=64)
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())], None, None, "none")
    got = {p: Embedder(ckpts, spec.replace(precision=p)).embed(X0) for p in ("float32", "bfloat16")}
    a, b = got["float32"], got["bfloat16"]
    assert _cosine(b.tracin, a.tracin).min() >= 0.99
    assert _rel(b.tracin, a.tracin).min() > 1e-4
    assert _rel(b.norms[:, 0], a.norms[:, 0]).min() > 1e-4


def test_bad_precision_is_a_one_line_spec_error():
    with pytest.raises(SpecError) as err:
        gi.BuildSpec(precision="float16")
    assert str(err.value) == "BuildSpec.precision='float16': must be one of auto, float32, bfloat16"
    with pytest.raises(SpecError, match="cpu or cuda"):
        compute_precision("bfloat16", "meta")
    ckpts = load_checkpoints([(tiny_unet(1), scheduler())], None, None, "none")
    with pytest.raises(
        SpecError, match=r"^precision='bfloat16' runs on cpu or cuda devices, not 'meta'$"
    ):
        Embedder(ckpts, SPEC.replace(precision="bfloat16"), device="meta")  # before any work


def test_bfloat16_factors_multiply_in_bfloat16_into_float32_rows():
    """A Linear / Conv2d that autocast ran in bfloat16 forms its per-item weight gradient from
    bfloat16 factors, written (and accumulated) into float32: the float64 product of the same
    factors to bfloat16 rounding; other layers and float32 ones take float32 factors."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 40, generator=g), torch.randn(3, 40, 7, generator=g)
    xb, yb = factor_dtypes(torch.nn.Linear(7, 5), x, x.bfloat16())
    assert (xb.dtype, yb.dtype) == (torch.bfloat16, torch.bfloat16)
    conv_a, conv_d = factor_dtypes(
        torch.nn.Conv2d(5, 3, 3), x[:, :, :, None], x[:, :3, :, None].bfloat16()
    )
    assert (conv_a.dtype, conv_d.dtype) == (torch.bfloat16, torch.bfloat16)  # Conv2d alike
    view = torch.empty(3, 5, 7)
    bmm_into(view, xb, y.bfloat16(), True)
    bmm_into(view, xb, y.bfloat16(), False)
    want = 2 * (xb.double() @ y.bfloat16().double())
    assert view.dtype == torch.float32
    assert (view.double() - want).abs().max() <= 8e-3 * want.abs().max()
    for module, delta in ((torch.nn.GroupNorm(1, 5), x.bfloat16()), (torch.nn.Linear(7, 5), x)):
        a, d = factor_dtypes(module, x.bfloat16(), delta)
        assert (a.dtype, d.dtype) == (torch.float32, torch.float32)


def test_compute_precision_runs_a_linear_in_the_named_dtype_and_refuses_others():
    """bfloat16 is autocast to bfloat16 (not float16), float32 is no autocast; a device autocast
    does not cover and an unknown name are one-line SpecErrors."""
    lin, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    with compute_precision("bfloat16", "cpu"):
        assert lin(x).dtype == torch.bfloat16
    with compute_precision("float32", "cpu"):
        assert lin(x).dtype == torch.float32
    with pytest.raises(
        SpecError, match=r"^precision='bfloat16' runs on cpu or cuda devices, not 'mps'$"
    ):
        compute_precision("bfloat16", "mps")
    with pytest.raises(SpecError, match=r"^precision='float16': must be one of float32, bfloat16$"):
        compute_precision("float16", "cpu")
