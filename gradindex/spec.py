"""BuildSpec: every knob of an attribution index, validated, JSON round-trip, fingerprinted.

Holds:
- ``BuildSpec``: a frozen dataclass; each field's ``metadata["help"]`` doubles as CLI help.
- ``BuildSpec.draws(sample_shape)``: the K·M (timestep, noise) draws, identical for every
  sample (common random numbers), so a training image embedded at query time reproduces its
  stored row exactly.
- ``BuildSpec.input_noise(sample_shape)``: the noise x_t is made from under input perturbation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradindex.draws import draw_noise, draw_seed, grid_timesteps
from gradindex.errors import SpecError
from gradindex.spec_checks import (
    check_images,
    check_loss_weighting,
    check_timesteps,
    check_train_range,
    is_int,
    row_dim,
)

SPEC_PROJECTIONS: tuple[str, ...] = ("identity", "gaussian", "sjlt", "kronecker", "kronecker-sjlt")
"""What a BuildSpec may name: the maps of full gradient vectors in
``gradindex.featurize.projection``, and the ``HOOK_PROJECTIONS`` applied layer by layer inside
the gradient hooks (``gradindex.featurize.kronecker``): 'kronecker' splits d over the layers,
'kronecker-sjlt' gives each layer its own outputs and maps them all to d by sparse JL."""
HOOK_PROJECTIONS = ("kronecker", "kronecker-sjlt")
LOSSES = ("mse", "l1", "square")
METHODS = ("tracin", "retrac")  # the row sets every build stores, each with its search index
STORE_DTYPES = ("float32", "float16")
PRECISIONS = ("float32", "bfloat16")  # gradindex.featurize.precision
NORMS = ("exact", "projected")  # gradindex.featurize.kronecker
AUTO = "auto"
AUTO_FIELDS = ("projection", "precision", "norms")
"""The fields whose value may be ``AUTO``, resolved by the build from the model's size and the
device (``gradindex.featurize.auto``); a stored spec never holds it."""
RESIZE_MODES = ("bilinear", "nearest", "error")
LATENT_MODES = ("mean", "sample")
PRECONDITIONERS = ("none", "adam")
LOSS_WEIGHTINGS = ("none", "snr", "min_snr")  # gradindex.featurize.losses.loss_weights
CHOICES = {
    "projection": (AUTO, *SPEC_PROJECTIONS),
    "loss": LOSSES,
    "store_dtype": STORE_DTYPES,
    "resize": RESIZE_MODES,
    "latents": LATENT_MODES,
    "precondition": PRECONDITIONERS,
    "snr_weighting": LOSS_WEIGHTINGS,
    "precision": (AUTO, *PRECISIONS),
    "norms": (AUTO, *NORMS),
}
"""The fields that name one of a few values (the CLI's choices)."""
NOT_IDENTITY = ("batch_size",)
"""Fields that change how rows are computed, not what they are (equal up to float32 summation
order): left out of the fingerprint, so a build resumed or a shard rebuilt with another batch
size (e.g. a smaller one after running out of memory) is the same index."""
OMITTED_AT_DEFAULT = {
    "precondition": "none",
    "snr_weighting": "none",
    "snr_gamma": None,
    "noise_offset": 0.0,
    "input_perturbation": 0.0,
    "resolution": None,
    "center_crop": False,
    "precision": "float32",
    "norms": "exact",
}
"""Fields added after indexes were built without them: left out of ``to_dict`` (so of the JSON
and the fingerprint) at these values, so those indexes keep their fingerprint; a stored dict
without them reads as these values (``BuildSpec.from_stored``; 'precision' and 'norms' now
default to 'auto', which a stored spec never holds)."""
_POSITIVE_WEIGHTS = (
    "must be 'auto' or positive finite numbers, one per checkpoint (a checkpoint that should not "
    "count is left out, not weighted 0)"
)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines the stored vectors. Two indexes built with equal specs from
    the same checkpoints and data hold the same numbers."""

    proj_dim: int = _help("Projected dimension d per checkpoint (rows have C·d columns).", 4096)
    projection: str = _help(
        "Random projection: 'sjlt' (sparse JL, fast), 'kronecker' (per-layer factors inside the "
        "gradient hooks, never forming most per-sample gradients), 'kronecker-sjlt' (per-layer "
        "factors, then sparse JL: closer to sjlt's fidelity), 'gaussian', 'identity'; 'auto': "
        "sjlt while a batch of 16's per-sample gradients fit in 1 GiB (up to 5.6M parameters "
        "at one noise draw: the 0.62M demo UNet), kronecker-sjlt above (a 35.7M DDPM), with "
        "projected norms where norms is 'auto'; decided at build time, stored, shown by info.",
        AUTO,
    )
    proj_seed: int = _help("Seed of the random projection (checkpoint c uses its own map).", 0)
    sjlt_nnz: int = _help("Nonzeros per input coordinate of the sparse JL projection.", 4)
    timesteps: int | tuple[int, ...] = _help(
        "K timesteps: a count (evenly spaced grid over the training range) or an explicit list.", 10
    )
    noise_draws: int = _help("M noise draws per timestep (gradients averaged over them).", 1)
    seed: int = _help(
        "Seed of the noise draws; draw (k, m) uses a generator seeded by (seed, k, m).", 0
    )
    loss: str = _help(
        "Per-sample loss: 'mse' (DDPM), 'l1' (ReTrac reference), 'square' (D-TRAK).", "mse"
    )
    params: tuple[str, ...] | None = _help(
        "Glob patterns of parameter names to take gradients over (default: all).", None
    )
    checkpoint_weights: tuple[float, ...] | str | None = _help(
        "TracIn weight w_c per checkpoint (learning rate × steps between checkpoints); default 1. "
        "'auto': the learning-rate sums between checkpoints from the run's own records (logged "
        "learning rates, else each checkpoint's scheduler state), resolved when the build starts.",
        None,
    )
    batch_size: int = _help("Training samples per gradient batch.", 16)
    store_dtype: str = _help("dtype of the stored vectors: 'float32' or 'float16'.", "float32")
    data_range: tuple[float, float] | None = _help(
        "Value range of float input images, mapped linearly to the model's [-1, 1] "
        "(uint8 images are 0..255 pixels: any other range is refused for them). Default: "
        "decided from the training data's values.",
        None,
    )
    resize: str = _help(
        "What to do with images whose size differs from the model's: 'bilinear', 'nearest', 'error'.",
        "bilinear",
    )
    latents: str = _help(
        "Latent models: how the VAE encodes training and query images, 'mean' of the latent "
        "distribution or 'sample' (one draw seeded by seed, the same noise for every image).",
        "mean",
    )
    precondition: str = _help(
        "Per-coordinate gradient scaling before norms, aggregation and projection: 'none', or "
        "'adam' (TrackStar): 1/(sqrt(v̂)+eps) from the Adam second moment in each checkpoint's "
        "optimizer.bin.",
        "none",
    )
    snr_weighting: str = _help(
        "Weight of each sample's loss by timestep, as the run trained: 'none'; 'snr' "
        "(train_unconditional.py with --prediction_type sample: snr(t)); 'min_snr' (the "
        "text-to-image scripts' --snr_gamma: min(snr, gamma)/snr, /(snr+1) for v-prediction).",
        "none",
    )
    snr_gamma: float | None = _help("gamma of 'min_snr' (the scripts' --snr_gamma, e.g. 5).", None)
    noise_offset: float = _help(
        "The run's --noise_offset: each noise draw gets offset·N(0, 1) added per channel.", 0.0
    )
    input_perturbation: float = _help(
        "The run's --input_perturbation p: x_t from ε + p·N(0, 1), the target from ε.", 0.0
    )
    resolution: int | None = _help(
        "Prepare images as diffusers' training scripts do (their --resolution): the shorter side "
        "resized to this (bilinear), then a centre square of this size; images may differ in "
        "size. Default: images are taken as they are (one size for all).",
        None,
    )
    center_crop: bool = _help(
        "The trainer cropped at the centre (its --center_crop). Its random crop cannot be "
        "repeated, so the centre crop is used either way; this records which it was.",
        False,
    )
    precision: str = _help(
        "The model's forward/backward in 'float32' or 'bfloat16' (autocast, cpu / cuda; faster "
        "with bfloat16 units, rows off by its rounding); per-item gradients and rows stay float32. "
        "'auto': bfloat16 where projection='auto' picks kronecker-sjlt and the device has "
        "bfloat16 units (CPU flag avx512_bf16 / amx_bf16, or a CUDA GPU), else float32.",
        AUTO,
    )
    norms: str = _help(
        "Each draw's gradient norm (ReTrac's normalization, the stored norms): 'exact' (full "
        "space) or 'projected' (of its projection; Kronecker only: no full-space work); "
        "'auto': projected where projection='auto' picks kronecker-sjlt, else exact.",
        AUTO,
    )
    num_train_timesteps: int | None = _help(
        "The scheduler's training range T (filled from the scheduler at build time).", None
    )

    def __post_init__(self) -> None:
        # normalise list-valued fields to tuples so the dataclass stays hashable and round-trips
        for name in ("timesteps", "params", "checkpoint_weights", "data_range"):
            value = getattr(self, name)
            if isinstance(value, (list, np.ndarray)) or (
                isinstance(value, tuple) and name != "timesteps"
            ):
                object.__setattr__(
                    self, name, tuple(value.tolist() if isinstance(value, np.ndarray) else value)
                )
        if isinstance(self.params, str):
            object.__setattr__(self, "params", (self.params,))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> SpecError:
            return SpecError(f"BuildSpec.{name}={getattr(self, name)!r}: {why}")

        for name in ("proj_dim", "noise_draws", "batch_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        if not is_int(self.sjlt_nnz) or not 0 < self.sjlt_nnz <= self.proj_dim:
            raise bad("sjlt_nnz", "must be a positive integer no larger than proj_dim")
        if self.projection in ("sjlt", AUTO) and self.proj_dim % self.sjlt_nnz:
            raise bad("proj_dim", f"must be a multiple of sjlt_nnz={self.sjlt_nnz} for 'sjlt'")
        check_timesteps(self, bad)
        for name in ("seed", "proj_seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer")
        if self.params is not None and (
            not self.params or not all(isinstance(p, str) and p for p in self.params)
        ):
            raise bad("params", "must be a non-empty list of glob patterns such as 'up_blocks.*'")
        if self.checkpoint_weights is not None and self.checkpoint_weights != "auto":
            w = self.checkpoint_weights
            if (
                isinstance(w, str)
                or not w
                or not all(isinstance(x, (int, float)) and np.isfinite(x) and x > 0 for x in w)
            ):
                raise bad("checkpoint_weights", _POSITIVE_WEIGHTS)
            object.__setattr__(self, "checkpoint_weights", tuple(float(x) for x in w))
        check_images(self, bad)
        if self.precondition == "adam" and self.projection in HOOK_PROJECTIONS:
            why = f"'adam' needs a dense projection, not {self.projection!r} (a diagonal scaling"
            raise bad("precondition", f"{why} is not Kronecker-factored)")
        if self.norms == "projected" and self.projection not in (*HOOK_PROJECTIONS, AUTO):
            why = f"a 'kronecker' projection (or 'kronecker-sjlt'), not {self.projection!r}"
            raise bad("norms", f"'projected' needs {why} (it forms g anyway); or norms='exact'")
        check_loss_weighting(self, bad)
        check_train_range(self, bad)

    @property
    def num_timesteps(self) -> int:
        """K."""
        return self.timesteps if is_int(self.timesteps) else len(self.timesteps)

    @property
    def num_draws(self) -> int:
        """K·M, the number of (timestep, noise) draws per sample."""
        return self.num_timesteps * self.noise_draws

    def timestep_values(self) -> list[int]:
        """The K timesteps (``gradindex.draws.grid_timesteps``)."""
        return grid_timesteps(self.timesteps, self.num_train_timesteps)

    def draws(self, sample_shape: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        """The K·M (timestep, noise) draws in order (k major, m minor); noise is float32 of
        ``sample_shape`` (C, H, W) from a CPU generator seeded only by (seed, k, m): ε, plus
        noise_offset · N(0, 1) of shape (C, 1, 1) drawn next from the same generator (the
        target's noise, as the scripts' ``noise += offset * randn(B, C, 1, 1)``)."""
        return [(t, self._noise(k, m, sample_shape)[0]) for k, m, t in self._draw_index()]

    def input_noise(self, sample_shape: Sequence[int]) -> list[torch.Tensor] | None:
        """Per draw, the noise x_t is made from: ε + input_perturbation · ξ, ξ ~ N(0, 1) drawn
        after ε (and its offset) from the draw's generator; None when input_perturbation is 0."""
        if not self.input_perturbation:
            return None
        return [self._noise(k, m, sample_shape)[1] for k, m, _ in self._draw_index()]

    def _draw_index(self) -> list[tuple[int, int, int]]:
        """(k, m, t_k) of every draw, k major."""
        ts, M = self.timestep_values(), self.noise_draws
        return [(k, m, t) for k, t in enumerate(ts) for m in range(M)]

    def _noise(self, k: int, m: int, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (k, m)'s target noise and input noise (``gradindex.draws.draw_noise``)."""
        seed = draw_seed(self.seed, k, m)
        return draw_noise(seed, shape, self.noise_offset, self.input_perturbation)

    def weights(self, num_checkpoints: int) -> tuple[float, ...]:
        """w_c for each checkpoint, checking the count matches."""
        if self.checkpoint_weights is None:
            return (1.0,) * num_checkpoints
        if self.checkpoint_weights == "auto":
            raise SpecError("BuildSpec.checkpoint_weights='auto' is resolved by build_index")
        if len(self.checkpoint_weights) != num_checkpoints:
            raise SpecError(
                f"BuildSpec.checkpoint_weights has {len(self.checkpoint_weights)} values for "
                f"{num_checkpoints} checkpoints: give one weight per checkpoint"
            )
        return self.checkpoint_weights

    def check_row_dim(self, num_params: int, num_checkpoints: int) -> int:
        """D, the columns of a stored row, refused above MAX_ROW_DIM before anything is
        computed (``spec_checks.row_dim``)."""
        return row_dim(self.projection, self.proj_dim, num_params, num_checkpoints)

    def to_dict(self) -> dict[str, Any]:
        """Every field but those at their ``OMITTED_AT_DEFAULT`` value while that is still the
        default (a float32 precision and exact norms are written: 'auto' is the default now)."""
        return self._as_dict(every_omitted=False)

    def _as_dict(self, every_omitted: bool) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, value in OMITTED_AT_DEFAULT.items():
            if d[k] == value and (every_omitted or _FIELD_DEFAULTS[k] == value):
                del d[k]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, indented, so specs diff cleanly."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(f"unknown BuildSpec field(s): {', '.join(unknown)}")
        data = dict(data)
        for key in ("timesteps", "params", "checkpoint_weights", "data_range"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> BuildSpec:
        """A spec as an index stored it: a field left out (``OMITTED_AT_DEFAULT``) holds the
        value it had when left out, whatever the field's default is now ('auto')."""
        return cls.from_dict({**OMITTED_AT_DEFAULT, **data})

    def answers(self, request: BuildSpec) -> bool:
        """Whether this (built, resolved) spec is what ``request`` asks for, the fields it
        leaves to 'auto' taking whatever the build decided."""
        request = request.settled()
        free = [f for f in AUTO_FIELDS if getattr(request, f) == AUTO]
        return self.settled().replace(**{f: getattr(request, f) for f in free}) == request

    def settled(self) -> BuildSpec:
        """This spec with norms 'auto' beside a chosen projection as the build decides it
        ('exact'), so such a spec fingerprints and compares as the built one."""
        if self.norms == AUTO and self.projection != AUTO:
            return self.replace(norms="exact")
        return self

    @classmethod
    def from_json(cls, text: str) -> BuildSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError("spec JSON must be an object of BuildSpec fields")
        return cls.from_dict(data)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the stored vectors (all but ``NOT_IDENTITY``)."""
        canonical = self.settled()._as_dict(every_omitted=True)  # as before the fields were
        return {k: v for k, v in canonical.items() if k not in NOT_IDENTITY}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of :meth:`identity`: specs that give the same vectors
        have equal fingerprints, whatever their batch size."""
        text = json.dumps(self.identity(), sort_keys=True, indent=2)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fingerprints(self) -> tuple[str, str]:
        """The fingerprint and the one indexes built before ``NOT_IDENTITY`` recorded (the
        hash of the whole spec, batch size included): both name this spec."""
        text = json.dumps(self._as_dict(every_omitted=True), sort_keys=True, indent=2)
        return self.fingerprint(), hashlib.sha256(text.encode()).hexdigest()[:16]

    def diff(self, other: BuildSpec) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as {name: (self, other)}."""
        a, b = ({**OMITTED_AT_DEFAULT, **s.to_dict()} for s in (self, other))
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def replace(self, **changes: Any) -> BuildSpec:
        return dataclasses.replace(self, **changes)


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildSpec)}
