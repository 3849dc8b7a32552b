"""The query side: open a finished index, embed test images with its own spec, search.

Holds ``AttributionIndex``:

    idx = AttributionIndex.open(DIR)                 # checks manifest, files, format version
    idx.embed(images)        -> {"tracin": [B, D], "retrac": [B, D]}   # range: see prepare
    idx.search(vectors, k, method) -> SearchResult(scores [B, k], ids [B, k], rows [B, k])
    idx.search(emb["tracin"], k, "trak", lam=None)   # TRAK: TracIn query rows, kernel-corrected
    idx.search(emb["retrac"], k, "retrak")           # the kernel on the ReTrac rows
    idx.query(images, k, "influence")                # EK-FAC influence (query_influence)
    idx.query(images, k, method, labels=None, prompts=None)  -> the same, from images
    AttributionIndex.open(DIR, milvus=URI)           # the collections 'gradindex export' made
    AttributionIndex.open(DIR, backends={"tracin": b1, ...})  # any index.backend.SearchBackend

Search backends (:mod:`gradindex.search.backend`): one per stored method, in vectors.h5 rows.
Methods: the stored ones (``METHODS``: tracin, retrac) have their own rows and search index;
``SEARCH_METHODS`` adds ``trak`` / ``retrak`` (:mod:`gradindex.store.kernel`: a transformed query
through ``stored_method(method)``'s index, or a dual kernel's own scores of every indexed row)
and ``influence`` (``query_influence``). Checkpoints load lazily (only ``embed``/``query`` need
them), refused unless they are the index's (``gradindex.store.records``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError, SearchError
from gradindex.featurize.embedding import Embedder
from gradindex.inputs.devices import resolve_device
from gradindex.inputs.encoders import Conditioner
from gradindex.inputs.labels import ConditioningData, as_prompts
from gradindex.inputs.models import Checkpoint, CheckpointSource
from gradindex.inputs.pixels import image_size, to_model_input, to_nchw
from gradindex.inputs.prepare import prepare_images
from gradindex.inputs.ranges import query_range
from gradindex.query_influence import METHOD as INFLUENCE
from gradindex.query_influence import influence_query
from gradindex.search.backend import (
    SearchBackend,
    SearchResult,
    as_queries,
    check_backends,
    check_k,
    result_to_json,
)
from gradindex.search.faiss_common import METHODS
from gradindex.search.faiss_folder import open_faiss_backends
from gradindex.search.kernel_recall import searches_exactly, share_rows
from gradindex.search.milvus import MilvusBackend
from gradindex.search.milvus import open_backends as milvus_backends
from gradindex.spec import BuildSpec
from gradindex.store.columns import LazyColumn, all_done, search_rows
from gradindex.store.kernel import KERNEL_METHODS, Kernel, check_lambdas
from gradindex.store.kernel_dual import DualKernel
from gradindex.store.kernel_load import DenseKernel, load_kernel
from gradindex.store.layout import (
    FACTORS,
    KERNEL,
    MANIFEST,
    RESTORE,
    VECTORS,
    check_files,
    ids_digests,
    read_manifest,
)
from gradindex.store.records import (
    check_given_sources,
    check_records,
    check_shapes,
    check_structure,
    recorded_checkpoints,
    summary,
)
from gradindex.store.vectors import VectorStore

logger = logging.getLogger(__name__)

__all__ = ["SEARCH_METHODS", "AttributionIndex", "SearchResult", "result_to_json", "stored_method"]

SEARCH_METHODS = (*METHODS, *KERNEL_METHODS, INFLUENCE)
"""What search / query accept: the stored methods plus those served from their rows."""


def stored_method(method: str) -> str:
    """The stored rows a search method's query vectors are: ``trak`` takes TracIn rows,
    ``retrak`` ReTrac rows; 'influence' searches the TracIn rows with its own query rows."""
    return "tracin" if method == INFLUENCE else KERNEL_METHODS.get(method, method)


class AttributionIndex:
    """A finished TracIn + ReTrac index folder, opened read-only."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        checkpoints: list[CheckpointSource] | None,
        scheduler: Any,
        device: str,
        mmap: bool,
        base_model: Any = None,
        milvus: str | MilvusBackend | None = None,
        backends: Mapping[str, SearchBackend] | None = None,
    ):
        self.path = path
        self._base_model = base_model
        self._conditioner: Conditioner | None = None
        self.manifest = manifest
        self.spec = BuildSpec.from_stored(manifest["spec"])
        self.device = resolve_device(device)
        check_given_sources(manifest, checkpoints)  # count and folders now, weights when loaded
        self._checkpoint_sources = checkpoints
        self._scheduler = scheduler
        self._embedder: Embedder | None = None
        if problems := check_files(path, manifest, checksums=False, skip=(KERNEL, FACTORS)):
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IndexStateError(f"{problems[0]}; rebuild the index{more}")
        with VectorStore.open(path / VECTORS) as store:
            store.check_manifest(manifest)  # another build's file, spec or shape
            digests = ids_digests(path, manifest)  # ids read on demand, each block checked
            self.ids: LazyColumn = LazyColumn(path / VECTORS, "ids", digests=digests)
            self.flagged: LazyColumn = LazyColumn(path / VECTORS, "flagged", as_bool=True)
            check_structure(path / MANIFEST, manifest)
            check_records(path / MANIFEST, manifest, self.spec, self.flagged)
            if not all_done(path / VECTORS):
                raise IndexStateError(f"{path / VECTORS}: rows never written; resume the build")
            self.index_rows = search_rows(self.flagged)  # search-index row i → store row
            if milvus is not None and backends is not None:
                raise SearchError("give milvus= or backends=, not both")
            if milvus is not None:  # shorthand for its collections' backends
                backends = milvus_backends(milvus, path, manifest, len(self.index_rows))
            if backends is None:
                backends = open_faiss_backends(path, manifest, store, self.index_rows, mmap)
        self.backends = check_backends(backends, METHODS, self.dim, len(self.index_rows))
        self._norms: np.ndarray | None = None  # read on first use (see ``norms``)
        self._kernels: dict[str, Kernel | DualKernel | DenseKernel] = {}  # read when first used
        if self.device.startswith("cuda"):  # search where the embeddings are made
            for backend in self.backends.values():
                backend.to_gpu()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        checkpoints: list[CheckpointSource] | None = None,
        scheduler: Any = None,
        device: str = "cpu",
        mmap: bool = False,
        base_model: Any = None,
        milvus: str | MilvusBackend | None = None,
        backends: Mapping[str, SearchBackend] | None = None,
    ) -> AttributionIndex:
        """Open an index folder. ``checkpoints`` overrides the recorded checkpoint sources
        (needed when the index was built from in-memory models); ``base_model`` the recorded
        VAE / text encoder / tokenizer folder (or a mapping of those objects). ``milvus``: a
        Milvus URI (or a ``gradindex.search.milvus.MilvusBackend``) that ``search`` / ``query`` then
        answer from, instead of the folder's FAISS indexes; the collections must come from
        ``gradindex export`` of this very build. ``backends``: {method: SearchBackend} for every
        stored method, over the folder's unflagged rows, answering in store rows (any backend;
        see :mod:`gradindex.search.backend`)."""
        p = Path(path)
        return cls(
            p, read_manifest(p), checkpoints, scheduler, device, mmap, base_model, milvus, backends
        )

    # -- stored data ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def norms(self) -> np.ndarray:
        """Per-draw gradient norms [N, C, K·M] (float32), read from vectors.h5 on first use:
        searching never needs them, and at N·C·K·M·4 bytes they can be large."""
        if self._norms is None:
            with VectorStore.open(self.path / VECTORS) as store:
                self._norms = store.norms
        return self._norms

    def kernel_for(self, method: str) -> Kernel | DualKernel | DenseKernel:
        """A kernel method's factors and λ (kernel.h5), read on first use (checked there); a
        dual kernel scores the rows its search index holds (``share_rows``)."""
        rows = KERNEL_METHODS[method]
        if rows not in self._kernels:
            kernel = load_kernel(self.path, self.manifest, rows, verify=not self._kernels)
            self._kernels[rows] = share_rows(kernel, self.backends[rows])
        return self._kernels[rows]

    def kernel_vectors(self, rows: np.ndarray, method: str, lam: Any = None) -> np.ndarray:
        """Query rows of ``stored_method(method)`` → the rows whose inner product with the
        stored ones is ``method``'s kernel score. ``lam``: one λ or one per checkpoint."""
        return self.kernel_for(method).transform(as_queries(rows, self.dim), lam)

    def check_kernel(self, method: str, lam: Any = None) -> None:
        """Refuse a missing kernel or a bad λ now, before the slow embedding of a query."""
        lambdas = self.kernel_for(method).lambdas
        check_lambdas(lambdas if lam is None else lam, len(lambdas))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def vectors(self, method: str) -> np.ndarray:
        """Stored rows of one method, float32 [N, D] (flagged rows included, as stored)."""
        if method not in METHODS:
            raise SearchError(
                f"no stored rows for method {method!r}; use one of {', '.join(METHODS)}"
            )
        with VectorStore.open(self.path / VECTORS) as store:
            return store.vectors(method)

    def verify(self) -> None:
        """Recompute every file's checksum against the manifest; raise naming the bad files."""
        problems = check_files(self.path, self.manifest, checksums=True, fix=RESTORE)
        if problems:
            raise IndexStateError("; ".join(problems))

    def info(self) -> dict[str, Any]:
        """What the manifest records about this index (see ``index.records.summary``)."""
        return summary(self.path, self.manifest, self.conditioning)

    # -- embedding ----------------------------------------------------------------------

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            base_model = self._base_model or self.manifest.get("base_model")
            ckpts = recorded_checkpoints(
                self.manifest, self._checkpoint_sources, self._scheduler, base_model
            )
            self.loaded_checkpoints: list[Checkpoint] = ckpts
            # the build's featurize path (an index from before the record: the full one)
            path = (self.manifest.get("featurize") or {}).get("path", "full")
            self._embedder = Embedder(ckpts, self.spec, self.device, path)
        return self._embedder

    @property
    def conditioning(self) -> dict[str, Any]:
        """The manifest's conditioning record: kind ("none", "class", "text"), latent, ..."""
        return self.manifest.get("conditioning") or {"kind": "none", "latent": False}

    def _get_conditioner(self) -> Conditioner:
        if self._conditioner is None:
            self._conditioner = Conditioner.from_record(
                self.manifest.get("conditioning"), self._base_model, self.device
            )
        return self._conditioner

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model (its VAE, for a latent model) takes."""
        c, h, w = self.manifest.get("image_shape", self.manifest["sample_shape"])
        return int(c), int(h), int(w)

    def prepare(self, images: Any, data_range: tuple[float, float] | None = None) -> Any:
        """Images (array/tensor) → pixel input of the model (of its VAE, for a latent model).

        The value range is each image's own, decided as the build decided the training data's
        (``gradindex.inputs.ranges.query_range``): uint8 → 0..255, floats within [0, 1] or
        [-1, 1] → that range, so a diffusers pipeline's [0, 1] output works on an index built
        from uint8 files. Floats wider than [-1, 1] take the index's recorded range when they
        lie within it; else ``data_range=(low, high)`` must be given. Never from the images
        beside it: a batch whose images come out in different ranges is refused."""
        c, h, w = self.image_shape
        if hasattr(images, "detach"):  # a torch tensor, maybe on a GPU
            images = images.detach().cpu().numpy()
        images = to_nchw(images)  # its shape refused before its values are looked at
        images = prepare_images(images, self.spec.resolution, self.spec.center_crop)
        data_range = query_range(images, self.spec.data_range, data_range)
        return to_model_input(
            images, channels=c, size=(h, w), data_range=data_range, resize=self.spec.resize
        )

    def resized_from(self, images: Any) -> tuple[int, int] | None:
        """(H, W) of ``images`` when it differs from the model's (they are resized), else None."""
        size = image_size(prepare_images(images, self.spec.resolution, self.spec.center_crop))
        return size if size != self.image_shape[1:] else None

    def embed(
        self,
        images: Any,
        batch_size: int | None = None,
        labels: Any = None,
        prompts: Any = None,
        data_range: tuple[float, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Test images → {"tracin": [B, D], "retrac": [B, D]} float32, with the index's spec.
        ``labels`` / ``prompts``: one per image or one for all, for a class- / text-conditional
        index; ``data_range``: the images' value range, when it cannot be told (``prepare``)."""
        embedder, conditioner = self._get_embedder(), self._get_conditioner()
        sample = embedder.sample_shape  # the model's, checked before any image is resized
        check_shapes(self.path / MANIFEST, self.manifest, sample, conditioner.image_shape(sample))
        x0 = self.prepare(images, data_range)
        batches = self.model_batches(x0, labels, prompts, batch_size or self.spec.batch_size)
        parts = [embedder.embed(xb, kwargs) for xb, kwargs in batches]
        embedder.release()  # its work buffers (over 300 MB for a batch of 16) not held after
        out = {m: np.concatenate([getattr(p, m) for p in parts]) for m in METHODS}
        flagged = np.concatenate([p.flagged for p in parts])
        if flagged.any():
            raise SearchError(
                f"{int(flagged.sum())} query image(s) gave non-finite or zero gradients; "
                "they cannot be scored"
            )
        return out

    def model_batches(
        self, x0: Any, labels: Any, prompts: Any, batch_size: int
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(model input: pixels or VAE latents, conditioning kwargs) of ``x0``, per batch."""
        conditioner, n = self._get_conditioner(), len(x0)
        if conditioner.kind == "none" and (labels is not None or prompts is not None):
            raise SearchError("this index is unconditional: drop labels / prompts")
        data = ConditioningData(
            labels=None if labels is None else conditioner.labels_from(labels, n),
            prompts=None if prompts is None else as_prompts(prompts, n),
        )
        for i in range(0, n, batch_size):
            xb = x0[i : i + batch_size]
            yield (
                conditioner.encode_images(xb),
                conditioner.model_kwargs(data.rows(i, i + batch_size), len(xb)),
            )

    def search(
        self,
        vectors: np.ndarray,
        k: int = 10,
        method: str = "retrac",
        exact: bool = False,
        lam: Any = None,
    ) -> SearchResult:
        """Top-k training samples for query rows ([B, D] or [D]) of ``stored_method(method)``
        ('influence': rows of ``embed_influence``), best first; ``lam``: a kernel method's λ."""
        _check_method(method, lam, damping=False)  # 'influence' rows are damped when made
        q = as_queries(vectors, self.dim)
        k = check_k(k, len(self.index_rows), "indexed samples")
        kernel = self.kernel_for(method) if method in KERNEL_METHODS else None
        if isinstance(kernel, DualKernel):  # scores every indexed row itself: exact
            scores, pos = kernel.top_k(q, k, lam)
            rows = np.asarray(self.index_rows[pos], dtype=np.int64)
            return SearchResult(scores=scores, ids=self.ids[rows], rows=rows)
        if kernel is not None:  # exact where its recall missed the target at build
            exact = exact or searches_exactly(self.manifest, method)
            q = kernel.transform(q, lam)
        res = self.backends[stored_method(method)].search(q, k, exact=exact)  # store rows
        return SearchResult(scores=res.scores, ids=self.ids[res.rows], rows=res.rows)

    def query(
        self,
        images: Any,
        k: int = 10,
        method: str = "retrac",
        exact: bool = False,
        labels: Any = None,
        prompts: Any = None,
        data_range: tuple[float, float] | None = None,
        lam: Any = None,
    ) -> SearchResult:
        """Top-k training samples for test images by any of ``SEARCH_METHODS`` (``lam``: a
        kernel method's λ, or 'influence''s damping); ``labels`` / ``prompts`` condition a
        conditional model, ``data_range`` is the images' value range (see ``embed``).
        ``result.resized``: the images' (H, W) when resized to the model's size, else None."""
        _check_method(method, lam)
        check_k(k)  # before the embedding, which is the slow part
        if method in KERNEL_METHODS:
            self.check_kernel(method, lam)
        if method == INFLUENCE:  # lam: its damping, applied while embedding
            return influence_query(self, images, k, exact, labels, prompts, data_range, lam)
        vectors = self.embed(images, labels=labels, prompts=prompts, data_range=data_range)
        res = self.search(vectors[stored_method(method)], k, method, exact=exact, lam=lam)
        return dataclasses.replace(res, resized=self.resized_from(images))

    def query_each_label(
        self, images: Any, k: int = 10, method: str = "retrac", exact: bool = False
    ) -> dict[int, SearchResult]:
        """Class-conditional index: {label: top-k} for every class label, each scored
        separately (the images' attribution had the model been asked for that class)."""
        num_classes = self.conditioning.get("num_classes")
        if self.conditioning["kind"] != "class" or not num_classes:
            raise SearchError("query_each_label needs a class-conditional index")
        return {c: self.query(images, k, method, exact=exact, labels=c) for c in range(num_classes)}

    def __repr__(self) -> str:
        return f"AttributionIndex({str(self.path)!r}, rows={len(self)}, dim={self.dim})"


def _check_method(method: str, lam: Any = None, damping: bool = True) -> None:
    """A method search knows; λ (a kernel method's ridge) refused with another, not ignored."""
    if method not in SEARCH_METHODS:
        raise SearchError(f"unknown method {method!r}; use one of {', '.join(SEARCH_METHODS)}")
    allowed = (*KERNEL_METHODS, INFLUENCE) if damping else tuple(KERNEL_METHODS)
    if lam is not None and method not in allowed:
        raise SearchError(f"lambda applies to {' / '.join(map(repr, allowed))} only: {method!r}")
