"""Reusable work buffers (float32 unless asked), kept between calls.

Fresh memory costs a page fault per 4 KiB on first touch (as much time as the arithmetic that
fills it, docs/build-speed.md), and glibc returns blocks over 32 MiB to the
system on free, so a large tensor allocated per call pays that every call. The featurizers
(per-item gradients, the features, the aggregation's per-block parts) and the Conv2d patch
copies take their buffers from here instead. Not thread-safe: callers run one at a time per
process, and a buffer handed out by ``get`` is valid until the next ``get`` of the same name.
Kept for a run of batches only: ``Embedder.release`` drops them when it is over (a build's rows
and fidelity check, a query's images), so no later stage holds them beside its own memory.
"""

from __future__ import annotations

import torch


class Scratch:
    """Named buffers per device and dtype, grown on demand, never shrunk (a grown one's old
    memory is released before the new allocation unless a caller still holds a view of it)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` (contents undefined)."""
        numel = 1
        for s in shape:
            numel *= s
        key = (name, torch.device(device), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        """Drop every buffer (memory back to the allocator)."""
        self._buffers.clear()

    def nbytes(self) -> int:
        """Bytes the buffers hold now."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


scratch = Scratch()
