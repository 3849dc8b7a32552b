"""gradindex: a vector-search index for training-data attribution in diffusion models.

The handful of names a user needs::

    import gradindex as gi
    spec = gi.BuildSpec(proj_dim=4096, timesteps=10)
    idx = gi.build_index(checkpoints=[...], data=images, out="my_index", spec=spec)
    idx = gi.AttributionIndex.open("my_index")
    scores, ids = idx.query(test_images, k=10, method="retrac")

Names are imported lazily (PEP 562) so ``gradindex --help`` and light users do not pay for
importing torch, diffusers and faiss up front, and so the OpenMP defaults of
:mod:`gradindex.inputs.threads` (a short OpenMP spin at every barrier, so waiting threads do
not take a shared machine's cores from working ones) are in the environment before
torch or FAISS loads libgomp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradindex.inputs.threads import apply_openmp_defaults

apply_openmp_defaults()

__version__ = "0.1.0"

_EXPORTS = {
    "AttributionIndex": "gradindex.query",
    "BuildSpec": "gradindex.spec",
    "DataError": "gradindex.errors",
    "GradIndexError": "gradindex.errors",
    "IndexStateError": "gradindex.errors",
    "ModelError": "gradindex.errors",
    "SearchError": "gradindex.errors",
    "SearchResult": "gradindex.search.faiss_index",
    "SpecError": "gradindex.errors",
    "VectorIndex": "gradindex.search.faiss_index",
    "build_index": "gradindex.build.pipeline",
}

__all__ = [
    "AttributionIndex",
    "BuildSpec",
    "DataError",
    "GradIndexError",
    "IndexStateError",
    "ModelError",
    "SearchError",
    "SearchResult",
    "SpecError",
    "VectorIndex",
    "__version__",
    "build_index",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradindex' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from gradindex.build.pipeline import build_index
    from gradindex.errors import (
        DataError,
        GradIndexError,
        IndexStateError,
        ModelError,
        SearchError,
        SpecError,
    )
    from gradindex.query import AttributionIndex
    from gradindex.search.faiss_index import SearchResult, VectorIndex
    from gradindex.spec import BuildSpec
