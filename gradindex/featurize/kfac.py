"""EK-FAC curvature of the diffusion loss, per layer and checkpoint, and the influence query.

The curvature is the generalised Gauss-Newton of the training loss (per-sample MSE, the mean
over a sample's D output elements: ∂²ℓ/∂f² = (2/D)·I), estimated by Monte Carlo as the paper
(Mlodozeniec et al., ICLR 2025) does: the output gradient is drawn as δ_f = √(2/D)·ξ with
ξ ~ N(0, I) (a target sampled from the model's Gaussian predictive), so E[g̃ g̃ᵀ] = JᵀHJ = GGN.
One (t, ε, ξ) draw per training sample, t uniform over the scheduler's steps.

Per Linear / Conv2d weight (not grouped, zero padding; shared weights excluded) of shape
out × in (in·kh·kw for a convolution, the patch layout of ``F.unfold``):

    A = mean_i (1/L) Σ_pos a_pos a_posᵀ      S = mean_i Σ_pos δ_pos δ_posᵀ       (K-FAC)
    A = Q_A diag Q_Aᵀ, S = Q_S diag Q_Sᵀ;  Λ = mean_i (Q_Sᵀ G̃_i Q_A)²            (EK-FAC)

with L the positions of one call and G̃_i item i's sampled-target weight gradient; the
eigenvalues Λ [out, in] are re-fitted on those gradients (a second pass, after the
eigenbases). Every other selected parameter (biases, GroupNorm, Embedding, ...) takes the
diagonal of the same GGN, mean_i g̃_i².

The influence query of a full-space gradient g (``precondition``), per layer:
G ↦ Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + λ_l)] Q_Aᵀ, and g ↦ g ⊘ (diag + λ_l) elsewhere, with
λ_l = damping · mean(Λ_l) (mean of the diagonal of that parameter); damping 0.1 is
kronfluence's heuristic default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradindex.errors import ModelError, SpecError
from gradindex.featurize.embedding import Embedder
from gradindex.featurize.gradients import GradientFeaturizer
from gradindex.featurize.layer_grads import factorable
from gradindex.featurize.losses import noisy_input_and_target
from gradindex.featurize.persample import HookGradients
from gradindex.featurize.taps import Tap, parameter_owners, run_taps

DAMPING = 0.1
"""Default λ_l / mean eigenvalue of layer l (kronfluence's heuristic damping)."""


@dataclass
class LayerFactors:
    """One factored weight: its columns in the flattened gradient and its EK-FAC factors."""

    name: str
    cols: tuple[int, int]
    shape: tuple[int, int]  # (out, in·kh·kw)
    A: Tensor  # [in, in] float64
    S: Tensor  # [out, out]
    QA: Tensor | None = None
    QS: Tensor | None = None
    eig: Tensor | None = None  # [out, in] corrected eigenvalues


@dataclass
class CheckpointFactors:
    """The factors of one checkpoint: factored layers, the diagonal of the other columns."""

    layers: list[LayerFactors]
    diag: Tensor  # [p] float64, 0 on factored columns
    diag_slices: dict[str, tuple[int, int]]  # unfactored parameter name -> its columns
    samples: int = 0
    extra: dict = field(default_factory=dict)


def _patches(module: nn.Module, a: Tensor) -> Tensor:
    """A layer's inputs as [I, in_k, L] (Linear: in over its L positions)."""
    if isinstance(module, nn.Conv2d):
        return F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)


def _deltas(module: nn.Module, delta: Tensor) -> Tensor:
    """A layer's output gradients as [I, out, L]."""
    if isinstance(module, nn.Conv2d):
        return delta.reshape(delta.shape[0], delta.shape[1], -1)
    return delta.reshape(delta.shape[0], -1, delta.shape[-1]).transpose(1, 2)


def _gram(x: Tensor) -> Tensor:
    """Σ_i Σ_l x[i, :, l] x[i, :, l]ᵀ of x [I, k, L]: one float32 matrix product over the batch's
    I·L columns (a batch's sum; the running sums over batches are float64)."""
    m = x.transpose(1, 2).reshape(-1, x.shape[1])
    return (m.T @ m).double()


def ggn_loss(output: Tensor, xi: Tensor) -> Tensor:
    """Per-item pseudo-loss whose output gradient is √(2/D)·ξ: sampled-target GGN of the MSE."""
    scale = math.sqrt(2.0 / output[0].numel())
    return scale * (output * xi).flatten(1).sum(1)


class FactorEstimator:
    """EK-FAC factors of one checkpoint over batches of clean samples (two passes)."""

    def __init__(self, feat: GradientFeaturizer):
        if feat.scale is not None:
            raise SpecError("method 'influence' needs an index built with precondition='none'")
        if not HookGradients.supports(feat.model, feat.param_names):
            raise ModelError(
                "method 'influence' needs a batch-independent model whose parameters sit in "
                "Linear, Conv2d, GroupNorm, LayerNorm or Embedding modules"
            )
        self.feat = feat
        named = dict(feat.model.named_parameters())
        owners = parameter_owners(feat.model)
        self.modules: dict[str, nn.Module] = {}
        self.layers: list[LayerFactors] = []
        self.diag_slices: dict[str, tuple[int, int]] = {}
        self._bases32: dict[str, tuple[Tensor, Tensor]] = {}  # (QS, QA) for pass 2's products
        col = 0
        for name in feat.param_names:
            p = named[name]
            holders = owners[id(p)]
            cols = (col, col + p.numel())
            col += p.numel()
            module, attr = holders[0]
            if len(holders) == 1 and attr == "weight" and factorable(module):
                shape = (p.shape[0], p.numel() // p.shape[0])
                z = torch.zeros
                self.layers.append(
                    LayerFactors(
                        name,
                        cols,
                        shape,
                        z(shape[1], shape[1], dtype=torch.float64),
                        z(shape[0], shape[0], dtype=torch.float64),
                    )  # fmt: skip
                )
                self.modules[name] = module
            else:
                self.diag_slices[name] = cols
        self.num_params = col
        self.diag = torch.zeros(col, dtype=torch.float64)
        self.items = 0
        self.items_eig = 0
        self.hooks = HookGradients(feat.model, feat.param_names, ggn_loss)

    def _draws(self, x0: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """x_t, t, ξ of one draw per sample, a pure function of ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        n = x0.shape[0]
        steps = len(self.feat.alphas_cumprod)
        t = torch.randint(0, steps, (n,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xi = torch.randn(x0.shape, generator=gen)
        dev = self.feat.device
        x_t, _ = noisy_input_and_target(
            x0.to(dev, torch.float32), eps.to(dev), t.to(dev), self.feat.alphas_cumprod,
            self.feat.prediction_type,
        )  # fmt: skip
        return x_t, t.to(dev), xi.to(dev)

    def covariances(self, x0: Tensor, seed: int, cond: dict | None = None) -> None:
        """Pass 1: add a batch's A and S (K-FAC) contributions."""
        x_t, t, xi = self._draws(x0, seed)
        anchor = torch.zeros((), device=x_t.device, requires_grad=True)
        handles = [
            self.modules[lay.name].register_forward_hook(self._cov_hook(lay, anchor))
            for lay in self.layers
        ]
        try:
            run_taps(self.feat.model, ggn_loss, x_t, t, xi, cond, anchor)
        finally:
            for h in handles:
                h.remove()
        self.items += x0.shape[0]

    def _cov_hook(self, lay: LayerFactors, anchor: Tensor):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            with torch.no_grad():
                pa = _patches(module, args[0].detach().float())  # [I, in, L]
                lay.A += _gram(pa) / pa.shape[-1]

            def on_grad(delta: Tensor) -> None:
                with torch.no_grad():
                    lay.S += _gram(_deltas(module, delta.float()))  # [I, out, L]

            return Tap.apply(output, anchor, on_grad, False)

        return hook

    def eigenbases(self) -> None:
        """Between the passes: eigenbases of the mean A and S."""
        for lay in self.layers:
            lay.A /= self.items
            lay.S /= self.items
            lay.QA = torch.linalg.eigh(lay.A).eigenvectors
            lay.QS = torch.linalg.eigh(lay.S).eigenvectors
            self._bases32[lay.name] = (lay.QS.float(), lay.QA.float())
            lay.eig = torch.zeros(lay.shape, dtype=torch.float64)

    def eigenvalues(self, x0: Tensor, seed: int, cond: dict | None = None) -> None:
        """Pass 2 (the same draws as pass 1): corrected eigenvalues and the diagonal."""
        x_t, t, xi = self._draws(x0, seed)
        g = self.hooks.item_gradients(x_t, t, xi, cond=cond).float()  # [I, p]
        for lay in self.layers:  # float32 products, float64 running sums
            a, b = lay.cols
            qs, qa = self._bases32[lay.name]
            rot = qs.T @ g[:, a:b].view(-1, *lay.shape) @ qa  # [I, out, in]
            lay.eig += rot.square().sum(0).double()
        for a, b in self.diag_slices.values():
            self.diag[a:b] += g[:, a:b].square().sum(0).double()
        self.items_eig += x0.shape[0]

    def result(self) -> CheckpointFactors:
        for lay in self.layers:
            lay.eig /= self.items_eig
        return CheckpointFactors(
            self.layers, self.diag / self.items_eig, dict(self.diag_slices), self.items
        )


def estimate_factors(
    feat: GradientFeaturizer,
    batches: list[tuple[Tensor, dict | None]],
    seed: int = 0,
) -> CheckpointFactors:
    """EK-FAC factors of one checkpoint: ``batches`` of (x0 [B, C, H, W] in the model's range,
    conditioning keyword arguments), each given one seeded draw per sample."""
    est = FactorEstimator(feat)
    if not batches:
        raise SpecError("no training samples to estimate the influence factors from")
    for b, (x0, cond) in enumerate(batches):
        est.covariances(x0, seed * 1_000_003 + b, cond)
    est.eigenbases()
    for b, (x0, cond) in enumerate(batches):
        est.eigenvalues(x0, seed * 1_000_003 + b, cond)
    return est.result()


def layer_dampings(f: CheckpointFactors, damping: float) -> Iterator[tuple[str, float]]:
    """λ_l of every factored layer and unfactored parameter: damping · its mean eigenvalue
    (a floor of 1e-30 keeps an all-zero layer finite)."""
    for lay in f.layers:
        yield lay.name, max(damping * float(lay.eig.mean()), 1e-30)
    for name, (a, b) in f.diag_slices.items():
        yield name, max(damping * float(f.diag[a:b].mean()), 1e-30)


def check_damping(damping: float) -> float:
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise SpecError(f"damping={damping!r}: must be a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise SpecError(f"damping={damping!r}: must be finite and > 0")
    return value


def precondition(g: Tensor, f: CheckpointFactors, damping: float = DAMPING) -> Tensor:
    """Full-space gradients g [B, p] → (Ĝ + λI)⁻¹ g [B, p] float32, per layer (EK-FAC)."""
    lam = dict(layer_dampings(f, check_damping(damping)))
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    gd = g.double()
    for lay in f.layers:
        a, b = lay.cols
        rot = lay.QS.T @ gd[:, a:b].reshape(-1, *lay.shape) @ lay.QA
        rot /= lay.eig + lam[lay.name]
        out[:, a:b] = (lay.QS @ rot @ lay.QA.T).reshape(len(g), -1).float()
    for name, (a, b) in f.diag_slices.items():
        out[:, a:b] = (gd[:, a:b] / (f.diag[a:b] + lam[name])).float()
    return out


def influence_rows(
    embedder: Embedder,
    factors: list[CheckpointFactors],
    x0: Tensor,
    cond: dict | None,
    damping: float = DAMPING,
) -> np.ndarray:
    """Query rows [B, D] of method 'influence': concat_c √w_c P_c (Ĝ_c + λI)⁻¹ g_c(q), whose
    inner product with a stored TracIn row is Σ_c w_c g_c(q)ᵀ (Ĝ_c + λI)⁻¹ P_cᵀP_c g_c(z)."""
    blocks = []
    parts = zip(embedder.featurizers, embedder.projectors, embedder.weights, factors, strict=True)
    for feat, proj, w, f in parts:
        a = feat.featurize(x0, embedder.draws, cond, reuse=True).tracin  # [B, p]
        blocks.append(math.sqrt(w) * proj.project(precondition(a, f, damping).to(a.device)))
    return torch.cat(blocks, dim=1).cpu().numpy()
