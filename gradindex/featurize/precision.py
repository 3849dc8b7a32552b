"""The compute precision of the model's forward and backward (``BuildSpec.precision``).

'bfloat16' runs the model's forward under ``torch.autocast`` (CPU or CUDA), so its matmuls and
convolutions, and their backward, take bfloat16 inputs: the lever that moves a per-item
gradient's cost below float32's (docs/build-speed.md). The loss is taken in float32 of the
output; a Linear / Conv2d that ran in bfloat16 forms its per-item weight gradient from its
bfloat16 input and output gradient, written to float32 (``layer_grads.factor_dtypes``), every
other per-item gradient in float32, so norms, aggregation, projection and rows stay float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from gradindex.errors import SpecError

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
"""``BuildSpec.precision`` → the autocast dtype (None: no autocast)."""


def compute_precision(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context the model's forward runs in under ``precision`` on ``device``: nothing for
    float32, ``torch.autocast`` for bfloat16 (CPU and CUDA only)."""
    if precision not in AUTOCAST_DTYPES:
        raise SpecError(f"precision={precision!r}: must be one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return nullcontext()
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise SpecError(f"precision={precision!r} runs on cpu or cuda devices, not {kind!r}")
    return torch.autocast(kind, dtype=dtype)
