"""Images → stored-row vectors: featurize at every checkpoint, project, weight, concatenate.

Holds ``Embedder``, the one code path shared by the builder (training rows) and the query side
(test images), so a training image embedded at query time reproduces its stored row:

    x(z) = concat_c √w_c · P_c a_c(z)                      TracIn row  [D = C·d]
    u(z) = concat_c √w_c · P_c r_c(z) / ‖P_c r_c(z)‖        ReTrac row  [D]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradindex.featurize.auto import native_bfloat16, resolve_auto
from gradindex.featurize.budget import budget_bytes, choose_path, device_memory, resident_bytes
from gradindex.featurize.gradients import GradientFeaturizer, select_parameters
from gradindex.featurize.kronecker import KroneckerFeaturizer
from gradindex.featurize.projection import Projector, make_projector
from gradindex.featurize.scratch import scratch
from gradindex.featurize.streamed import StreamedFeaturizer, streamable
from gradindex.inputs.models import Checkpoint
from gradindex.spec import HOOK_PROJECTIONS, BuildSpec

logger = logging.getLogger(__name__)


@dataclass
class Embedding:
    """Rows for a batch of images."""

    tracin: np.ndarray  # [B, D] float32
    retrac: np.ndarray  # [B, D] float32
    norms: np.ndarray  # [B, C, K·M] float32
    flagged: np.ndarray  # [B] bool: non-finite or zero gradient somewhere (row unusable)


def projection_seed(proj_seed: int, checkpoint_index: int) -> int:
    """Checkpoint c gets its own map P_c, a pure function of (proj_seed, c)."""
    state = np.random.SeedSequence([int(proj_seed), int(checkpoint_index)]).generate_state(1)
    return int(state[0])


class Embedder:
    """Featurizers and projectors for every checkpoint of one spec.

    ``path``: how per-item gradients become rows ('full', 'streamed' or 'auto', see
    ``gradindex.featurize.budget``; the same numbers either way, up to float32 rounding): a
    build records the path taken (``path``) and a query passes it back. ``max_memory``: the
    memory budget in bytes (None: automatic), which sets the items per gradient call."""

    def __init__(
        self,
        checkpoints: list[Checkpoint],
        spec: BuildSpec,
        device: str | torch.device = "cpu",
        path: str = "auto",
        max_memory: int | None = None,
    ):
        self.device = torch.device(device)
        names = select_parameters(checkpoints[0].model, spec.params)
        spec = resolve_auto(spec, checkpoints[0].model, names, self.device)  # a build's is already
        if spec.precision == "bfloat16" and not native_bfloat16(self.device):  # e.g. a query
            logger.warning(  # of an index built where there were bfloat16 units
                "bfloat16 on %s, which has no bfloat16 units: emulated, so slower (same rows)",
                self.device,
            )
        self.spec = spec
        self.weights = spec.weights(len(checkpoints))
        self.max_memory = max_memory
        gpu = device_memory(self.device)
        budget = budget_bytes(max_memory, gpu_free=None if gpu is None else gpu[1])
        seeds = [projection_seed(spec.proj_seed, c) for c in range(len(checkpoints))]
        self.featurizers: list[GradientFeaturizer]
        if spec.projection in HOOK_PROJECTIONS:  # projected in the hooks: rows are [B, d]
            self.path = "kronecker"
            self.featurizers = [
                KroneckerFeaturizer(c, spec, seed, self.device)
                for c, seed in zip(checkpoints, seeds, strict=True)
            ]
        else:
            first = GradientFeaturizer(checkpoints[0], spec, self.device)
            can = streamable(first.model, first.param_names, spec)
            self.path = choose_path(
                path, can, first.num_params, spec.batch_size, spec.noise_draws, budget
            )
            if self.path == "streamed":
                self.featurizers = [
                    StreamedFeaturizer(c, spec, seed, self.device)
                    for c, seed in zip(checkpoints, seeds, strict=True)
                ]
            else:
                rest = [GradientFeaturizer(c, spec, self.device) for c in checkpoints[1:]]
                self.featurizers = [first, *rest]
        self.num_params = self.featurizers[0].num_params
        kind = (
            "identity"
            if spec.projection in HOOK_PROJECTIONS or self.path == "streamed"
            else spec.projection
        )
        self.projectors: list[Projector] = [
            make_projector(
                kind,
                self.featurizers[0].row_dim,
                spec.proj_dim,
                seed,
                nnz=spec.sjlt_nnz,
                device=self.device,
            )
            for seed in seeds
        ]
        self.block_dim = self.projectors[0].out_dim
        self._set_budget()
        self.dim = self.block_dim * len(checkpoints)
        self.sample_shape = checkpoints[0].sample_shape()
        self.draws = spec.draws(self.sample_shape)

    def _set_budget(self) -> None:
        """What the budget leaves for per-item work once models and projections are in memory
        (the process's resident size now; on a GPU, the device's allocated memory) and, on the
        full path, the [B, 2, p] features; and what an automatic budget on the CPU could add when
        one sample needs more than its preferred per-item share (``memory_spare``; None for a
        budget the user gave)."""
        gpu = device_memory(self.device)
        resident = resident_bytes() if gpu is None else gpu[0]
        budget = budget_bytes(self.max_memory, resident, None if gpu is None else gpu[1])
        left = budget - resident
        spare = None  # a budget the user gave: a limit
        if self.max_memory is None:
            spare = 0 if gpu is not None else max(0, budget_bytes(None) - left)
        if self.path == "full":
            left -= 8 * self.num_params * self.spec.batch_size
        for feat in self.featurizers:
            feat.memory_left, feat.budget, feat.memory_spare = left, budget, spare

    def featurize_record(self) -> dict[str, object]:
        """The manifest's record of how rows were computed (a query repeats ``path``)."""
        return {"path": self.path, "max_memory": self.max_memory}

    def release(self) -> None:
        """Drop the work buffers featurizing keeps between batches (per-item gradients,
        features: over 300 MB at the demo's batch of 16), once a run of batches is over, so
        that the stages after it (search indexes, kernel, searches, pictures) do not hold
        them; the next batch allocates them again."""
        scratch.clear()

    def layer_routes(self) -> dict[str, str]:
        """How each selected parameter's gradient is projected: 'kronecker d_out x d_in, ghost
        norm' etc. for factored layers, 'dense' where the per-sample gradient is formed."""
        feat = self.featurizers[0]
        if isinstance(feat, KroneckerFeaturizer):
            return {plan.name: plan.describe() for plan in feat.kron.plan}
        return dict.fromkeys(feat.param_names, "dense")

    def embed(
        self,
        x0: torch.Tensor,
        cond: dict[str, torch.Tensor] | None = None,
        keep: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> Embedding:
        """x0: [B, C, H, W] already in the model's range (latents for a latent model) → rows for
        both methods. cond: the model's per-sample conditioning keyword arguments
        (``gradindex.inputs.labels``), samples first. keep(c, tracin, retrac): shown each
        checkpoint's features [B, q] before projection (full space on the 'full' path), e.g.
        to keep the fidelity sample's (``fidelity_sample.HeldSample.take``)."""
        tracin_blocks, retrac_blocks, norm_blocks = [], [], []
        for c, (feat, proj, w) in enumerate(
            zip(self.featurizers, self.projectors, self.weights, strict=True)
        ):
            f = feat.featurize(x0, self.draws, cond, reuse=True)  # projected into new tensors
            if keep is not None:
                keep(c, f.tracin, f.retrac)
            sw = math.sqrt(w)
            tracin_blocks.append(sw * proj.project(f.tracin))  # [B, d]
            pr = proj.project(f.retrac)  # [B, d]
            retrac_blocks.append(sw * pr / pr.norm(dim=1, keepdim=True))
            norm_blocks.append(f.norms)  # [B, K·M]
        tracin = torch.cat(tracin_blocks, dim=1).cpu().numpy()
        retrac = torch.cat(retrac_blocks, dim=1).cpu().numpy()
        norms = torch.stack(norm_blocks, dim=1).cpu().numpy()  # [B, C, K·M]
        flagged = (
            ~np.isfinite(tracin).all(1)
            | ~np.isfinite(retrac).all(1)
            | ~np.isfinite(norms).all((1, 2))
            | (norms.reshape(len(norms), -1) == 0).any(1)
        )
        return Embedding(tracin, retrac, norms, flagged)
