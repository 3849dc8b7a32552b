"""Searching on the GPU: a sharded faiss-gpu clone of an index, or the reason there is none.

faiss-gpu (``pip install "gradindex[gpu]"``) has flat and IVF indexes, not HNSW; an IVF whose
lists are memory-mapped from disk stays on the CPU (larger than a GPU copy should be).
"""

from __future__ import annotations

import faiss

from gradindex.search.faiss_common import first_line

GPU_MAX_K = 2048  # FAISS GPU k-selection handles k up to this


def clone_to_gpus(
    index: faiss.Index, num_gpus: int | None
) -> tuple[faiss.Index | None, str | None]:
    """(a copy of ``index`` with its rows sharded over the GPUs, None) or (None, why not)."""
    reason = gpu_unavailable(index)
    if reason is not None:
        return None, reason
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # split the rows over the GPUs, not a copy on each
        return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=num_gpus or -1), None
    except (RuntimeError, AttributeError) as e:
        return None, f"cloning to the GPU failed ({first_line(e)})"


def gpu_unavailable(index: faiss.Index) -> str | None:
    """Why ``index`` cannot be searched on a GPU here, or None when it can."""
    base = faiss.downcast_index(
        index.index if isinstance(index, faiss.IndexPreTransform) else index
    )
    if not isinstance(base, faiss.IndexFlat | faiss.IndexIVF):
        return f"FAISS has no GPU version of {type(base).__name__} (build with kind flat or ivf)"
    if isinstance(base, faiss.IndexIVF) and isinstance(
        faiss.downcast_InvertedLists(base.invlists), faiss.OnDiskInvertedLists
    ):
        return "its inverted lists are on disk (memory-mapped), larger than a GPU copy should be"
    if not hasattr(faiss, "StandardGpuResources"):
        return 'this faiss has no GPU support (pip install "gradindex[gpu]" on a CUDA machine)'
    if faiss.get_num_gpus() == 0:
        return "faiss-gpu sees no CUDA device"
    return None
