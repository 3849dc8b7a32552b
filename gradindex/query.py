"""The query side: open a finished index, embed test images with its own spec, search.

Holds ``AttributionIndex``:

    idx = AttributionIndex.open(DIR)                 # checks manifest, files, format version
    idx.embed(images)        -> {"tracin": [B, D], "retrac": [B, D]}
    idx.search(vectors, k, method) -> SearchResult(scores [B, k], ids [B, k], rows [B, k])
    idx.query(images, k, method)   -> the same, from images
    idx.query(images, labels=[...]) / idx.query(images, prompts=[...])   conditional models
    AttributionIndex.open(DIR, milvus=URI)           # search the collections 'gradindex
                                                     # export DIR --milvus URI' made instead

Checkpoints are loaded lazily (only ``embed``/``query`` need them) from the sources recorded in
the manifest, or taken from the caller, and refused if their weights' fingerprint differs from
the one the index was built with.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradindex.conditioning import Conditioner, ConditioningData, as_prompts
from gradindex.data import to_model_input
from gradindex.devices import resolve_device
from gradindex.embedding import Embedder
from gradindex.errors import IndexStateError, ModelError, SearchError
from gradindex.layout import VECTORS, check_files, faiss_file, read_manifest
from gradindex.models import Checkpoint, CheckpointSource, load_checkpoints
from gradindex.search import METHODS, SearchResult, VectorIndex
from gradindex.spec import BuildSpec
from gradindex.store import VectorStore

if TYPE_CHECKING:
    from gradindex.milvus import MilvusBackend

logger = logging.getLogger(__name__)


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
    ):
        self.path = path
        self._base_model = base_model
        self._conditioner: Conditioner | None = None
        self.manifest = manifest
        self.spec = BuildSpec.from_dict(manifest["spec"])
        self.device = resolve_device(device)
        self._checkpoint_sources = checkpoints
        self._scheduler = scheduler
        self._embedder: Embedder | None = None
        problems = check_files(path, manifest, checksums=False)  # sizes only: cheap
        if problems:
            raise IndexStateError(
                f"{problems[0]}; rebuild the index"
                + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
            )
        with VectorStore.open(path / VECTORS) as store:
            self.ids: np.ndarray = store.ids
            self.flagged: np.ndarray = store.flagged
            if store.num_rows != manifest["num_rows"] or store.dim != manifest["dim"]:
                raise IndexStateError(f"{path / VECTORS}: shape differs from the manifest; rebuild")
            if not store.done.all():
                raise IndexStateError(
                    f"{path / VECTORS}: not every row was written; rebuild or resume"
                )
        self.index_rows = np.flatnonzero(~self.flagged)  # search-index row i → store row
        self._norms: np.ndarray | None = None  # read on first use (see ``norms``)
        self._indexes: dict[str, VectorIndex] = {}
        for method in METHODS if milvus is None else ():  # Milvus answers the searches then
            fpath = path / faiss_file(method)
            if not fpath.exists():
                raise IndexStateError(f"{fpath}: search index missing; rebuild the index")
            self._indexes[method] = VectorIndex.load(fpath, mmap=mmap)
            if self._indexes[method].ntotal != len(self.index_rows):
                raise IndexStateError(
                    f"{fpath}: holds {self._indexes[method].ntotal} rows, expected {len(self.index_rows)}"
                )
            if self.device.startswith("cuda"):  # search where the embeddings are made
                self._indexes[method].to_gpu()
        self.milvus: MilvusBackend | None = None
        if milvus is not None:
            from gradindex.milvus import MilvusBackend, default_name

            if not isinstance(milvus, MilvusBackend):
                milvus = MilvusBackend.connect(os.fspath(milvus), default_name(path))
            milvus.check_index(manifest, len(self.index_rows))
            self.milvus = milvus

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
    ) -> AttributionIndex:
        """Open an index folder. ``checkpoints`` overrides the recorded checkpoint sources
        (needed when the index was built from in-memory models); ``base_model`` the recorded
        VAE / text encoder / tokenizer folder (or a mapping of those objects). ``milvus``: a
        Milvus URI (or a ``gradindex.milvus.MilvusBackend``) that ``search`` / ``query`` then
        answer from, instead of the folder's FAISS indexes; the collections must come from
        ``gradindex export`` of this very build."""
        p = Path(path)
        return cls(p, read_manifest(p), checkpoints, scheduler, device, mmap, base_model, milvus)

    # -- stored data ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def norms(self) -> np.ndarray:
        """Per-draw gradient norms [N, C, K·M] (float32), read from vectors.h5 on first use:
        searching never needs them, and they are N·C·K·M·4 bytes (12 GB at 10⁸ samples with
        C = 3, K = 10), so opening an index does not read them."""
        if self._norms is None:
            with VectorStore.open(self.path / VECTORS) as store:
                self._norms = store.norms
        return self._norms

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def vectors(self, method: str) -> np.ndarray:
        """Stored rows of one method, float32 [N, D] (flagged rows included, as stored)."""
        _check_method(method)
        with VectorStore.open(self.path / VECTORS) as store:
            return store.vectors(method)

    def verify(self) -> None:
        """Recompute every file's checksum against the manifest; raise naming the bad files."""
        problems = check_files(self.path, self.manifest, checksums=True)
        if problems:
            raise IndexStateError("; ".join(problems))

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.path),
            "num_rows": m["num_rows"],
            "num_flagged": m.get("num_flagged", 0),
            "dim": m["dim"],
            "proj_dim": m["proj_dim"],
            "num_params": m["num_params"],
            "layers": m.get("layers", {}),
            "checkpoints": m["checkpoints"],
            "timesteps": m["timesteps"],
            "prediction_type": m["prediction_type"],
            "spec": m["spec"],
            "indexes": m["indexes"],
            "versions": m["versions"],
            "build_seconds": m.get("build_seconds"),
            "conditioning": self.conditioning,
            "fidelity": m.get("fidelity"),  # None for indexes built before it was measured
        }

    # -- embedding ----------------------------------------------------------------------

    def _get_embedder(self) -> Embedder:
        if self._embedder is None:
            records = self.manifest["checkpoints"]
            sources = self._checkpoint_sources
            if sources is None:
                memory = [r["source"] for r in records if r["source"].startswith("memory:")]
                if memory:
                    raise ModelError(
                        "this index was built from in-memory models: pass them to "
                        "AttributionIndex.open(path, checkpoints=[(model, scheduler), ...])"
                    )
                sources = [r["source"] for r in records]
            if len(sources) != len(records):
                raise ModelError(
                    f"the index has {len(records)} checkpoints but {len(sources)} were given"
                )
            base_model = self._base_model or self.manifest.get("base_model")
            ckpts = load_checkpoints(list(sources), self._scheduler, base_model)
            for i, (c, r) in enumerate(zip(ckpts, records, strict=True)):
                if c.fingerprint != r["fingerprint"]:
                    raise ModelError(
                        f"checkpoint {i} ({c.source}) has fingerprint {c.fingerprint} but the index was "
                        f"built with {r['fingerprint']}: the weights changed; rebuild the index"
                    )
            self.loaded_checkpoints: list[Checkpoint] = ckpts
            self._embedder = Embedder(ckpts, self.spec, self.device)
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

    def prepare(self, images: Any) -> Any:
        """Images (array/tensor, uint8 or float in the index's data range) → pixel input of
        the model (of its VAE, for a latent model)."""
        c, h, w = self.manifest.get("image_shape", self.manifest["sample_shape"])
        return to_model_input(
            images,
            channels=c,
            size=(h, w),
            data_range=tuple(self.spec.data_range),
            resize=self.spec.resize,
        )

    def embed(
        self,
        images: Any,
        batch_size: int | None = None,
        labels: Any = None,
        prompts: Any = None,
    ) -> dict[str, np.ndarray]:
        """Test images → {"tracin": [B, D], "retrac": [B, D]} float32, with the index's spec.
        A class-conditional index needs ``labels`` (one per image, or one for all; class names
        of a class-folder index work too), a text-conditional one ``prompts`` (likewise)."""
        x0 = self.prepare(images)
        embedder = self._get_embedder()
        conditioner = self._get_conditioner()
        n = len(x0)
        if conditioner.kind == "none" and (labels is not None or prompts is not None):
            raise SearchError("this index is unconditional: drop labels / prompts")
        data = ConditioningData(
            labels=None if labels is None else conditioner.labels_from(labels, n),
            prompts=None if prompts is None else as_prompts(prompts, n),
        )
        bs = batch_size or self.spec.batch_size
        parts = [
            embedder.embed(
                conditioner.encode_images(x0[i : i + bs]),
                conditioner.model_kwargs(data.rows(i, i + bs), len(x0[i : i + bs])),
            )
            for i in range(0, n, bs)
        ]
        out = {m: np.concatenate([getattr(p, m) for p in parts]) for m in METHODS}
        flagged = np.concatenate([p.flagged for p in parts])
        if flagged.any():
            raise SearchError(
                f"{int(flagged.sum())} query image(s) gave non-finite or zero gradients; "
                "they cannot be scored"
            )
        return out

    # -- search -------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, k: int = 10, method: str = "retrac", exact: bool = False
    ) -> SearchResult:
        """Top-k training samples for query rows ([B, D] or [D]), best first (from Milvus
        when the index was opened with ``milvus=``; same scores, ids and rows)."""
        _check_method(method)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise SearchError(f"query vectors have shape {q.shape}; expected [B, {self.dim}]")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise SearchError(f"k={k!r}: must be a positive integer")
        if k > len(self.index_rows):
            warnings.warn(
                f"k={k} exceeds the {len(self.index_rows)} indexed samples; returning all of them",
                stacklevel=2,
            )
            k = len(self.index_rows)
        if self.milvus is not None:  # its rows are already vectors.h5 row numbers
            res = self.milvus.search(q, int(k), method, exact=exact)
            return SearchResult(scores=res.scores, ids=self.ids[res.rows], rows=res.rows)
        res = self._indexes[method].search(q, int(k), exact=exact)
        rows = self.index_rows[res.rows]
        return SearchResult(scores=res.scores, ids=self.ids[rows], rows=rows)

    def query(
        self,
        images: Any,
        k: int = 10,
        method: str = "retrac",
        exact: bool = False,
        labels: Any = None,
        prompts: Any = None,
    ) -> SearchResult:
        """Top-k training samples for test images, by TracIn or ReTrac score; ``labels`` /
        ``prompts`` condition a class- / text-conditional model (see ``embed``)."""
        _check_method(method)
        vectors = self.embed(images, labels=labels, prompts=prompts)[method]
        return self.search(vectors, k, method, exact=exact)

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
        m = self.manifest
        return f"AttributionIndex({str(self.path)!r}, rows={m['num_rows']}, dim={m['dim']})"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SearchError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def result_to_json(result: SearchResult, method: str) -> list[dict[str, Any]]:
    """One JSON-able record per query row."""
    return [
        {
            "method": method,
            "ids": [x.item() if hasattr(x, "item") else x for x in ids],
            "rows": rows.tolist(),
            "scores": [float(s) for s in scores],
        }
        for scores, ids, rows in zip(result.scores, result.ids, result.rows, strict=True)
    ]
