"""Class labels and captions that travel with the data, and which kind a model needs.

Holds:
- ``conditioning_kind(model)``: "none", "class" (a ``UNet2DModel`` with ``num_class_embeds``)
  or "text" (a ``UNet2DConditionModel``, cross-attending to a text encoder's hidden states).
- ``ConditioningData``: per-row labels / captions of a data set or a query batch.
- ``load_conditioning(ref, ids, n, kind, labels=, prompts=)``: per-row labels / captions of a
  data set — given as arguments (a source's own columns: ``inputs.training_data``), as class
  sub-folders of an image folder, or as ``metadata.jsonl`` / ``metadata.csv`` (``file_name``,
  ``text``: the ``imagefolder`` layout diffusers' text_to_image example reads).
- ``as_labels`` / ``as_prompts``: one label / caption per row, checked.

What the model is then given for them (label lookups, text-encoder states):
``gradindex.inputs.encoders``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.errors import DataError, ModelError
from gradindex.inputs.dataref import DataRef

logger = logging.getLogger(__name__)

KINDS = ("none", "class", "text")


def conditioning_kind(model: torch.nn.Module) -> str:
    """What a UNet is conditioned on, from its diffusers config."""
    cfg = getattr(model, "config", None)
    num_classes = getattr(cfg, "num_class_embeds", None) if cfg is not None else None
    class_type = getattr(cfg, "class_embed_type", None) if cfg is not None else None
    if type(model).__name__ == "UNet2DConditionModel":
        if num_classes is not None or class_type is not None:
            raise ModelError(
                "a UNet2DConditionModel with class embeddings is not supported: use text or "
                "class conditioning, not both"
            )
        return "text"
    if class_type is not None:
        raise ModelError(
            f"class_embed_type={class_type!r} is not supported; class-conditional models need "
            "num_class_embeds (a label lookup table)"
        )
    return "class" if num_classes is not None else "none"


@dataclass
class ConditioningData:
    """Per-row conditioning of a data set (training rows or a query batch)."""

    labels: np.ndarray | None = None  # [N] int64
    prompts: list[str] | None = None  # N captions
    class_names: list[str] | None = None  # label → class sub-folder name

    def rows(self, start: int, stop: int) -> ConditioningData:
        return ConditioningData(
            None if self.labels is None else self.labels[start:stop],
            None if self.prompts is None else self.prompts[start:stop],
            self.class_names,
        )

    def digest(self) -> str | None:
        """sha256 of the labels and prompts: a resumed build must see the same ones."""
        if self.labels is None and self.prompts is None:
            return None
        h = hashlib.sha256()
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        if self.prompts is not None:
            h.update(json.dumps(self.prompts).encode())
        return h.hexdigest()[:16]


def load_conditioning(
    source: DataRef | None,
    ids: np.ndarray,
    n: int,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
) -> ConditioningData:
    """The labels / captions of the ``n`` rows of the data ``source`` (ids as read from it),
    for a model of conditioning ``kind``. Arguments win over what the data source holds; with
    ``required=False``, a source that holds none gives empty data instead of an error."""
    if kind == "none":
        if labels is not None or prompts is not None:
            raise DataError(
                "the model is unconditional but labels or prompts were given; drop them"
            )
        return ConditioningData()
    if kind == "class":
        if prompts is not None:
            raise DataError("the model is class-conditional: give labels, not prompts")
        class_names = None
        if labels is None:
            labels, class_names = _folder_classes(source, ids)
        if labels is None and not required:
            return ConditioningData()
        if labels is None:
            raise DataError(
                "the model is class-conditional but no labels were found: pass labels=[...] "
                "(CLI --labels FILE), an .npz with a 'labels' array, or a folder of class "
                "sub-folders"
            )
        return ConditioningData(labels=as_labels(labels, n), class_names=class_names)
    if kind == "text":
        if labels is not None:
            raise DataError("the model is text-conditional: give prompts, not labels")
        if prompts is None:
            prompts = _folder_captions(source, ids)
        if prompts is None and not required:
            return ConditioningData()
        if prompts is None:
            raise DataError(
                "the model is text-conditional but no captions were found: pass prompts=[...] "
                "(CLI --prompts FILE), an .npz with a 'captions' array, or an image folder with "
                "a metadata.jsonl of file_name / text"
            )
        return ConditioningData(prompts=as_prompts(prompts, n))
    raise ModelError(f"unknown conditioning kind {kind!r}")


def npz_columns(kind: str, labels: Any = None, prompts: Any = None) -> tuple[str, ...]:
    """The arrays of an ``.npz`` data file (``files.read_npz_data``) that hold what a model of
    conditioning ``kind`` needs, when none were given (given ones win: the file's are not read)."""
    if labels is not None or prompts is not None:
        return ()
    return {"class": ("labels",), "text": ("captions",)}.get(kind, ())


def npz_conditioning(arrays: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """(labels, prompts) from an ``.npz``'s arrays read for ``npz_columns`` (None: not read,
    or not there)."""
    captions = arrays.get("captions")
    return arrays.get("labels"), None if captions is None else captions.tolist()


def as_labels(labels: Any, n: int) -> np.ndarray:
    """Validate labels: one integer per row (a single integer is repeated for every row)."""
    arr = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"labels have shape {arr.shape} but there are {n} images; one per image")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise DataError(f"labels have dtype {arr.dtype}; class labels must be integers")
    return arr.astype(np.int64)


def as_prompts(prompts: Any, n: int) -> list[str]:
    """Validate prompts: one string per row (a single string is repeated for every row)."""
    if isinstance(prompts, str):
        prompts = [prompts] * n
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise DataError("prompts must be a list of strings, one per image")
    if len(prompts) != n:
        raise DataError(f"{len(prompts)} prompts for {n} images; give one prompt per image")
    return list(prompts)


def _folder_classes(
    source: DataRef | None, ids: np.ndarray
) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from class sub-folders (``root/<class>/<image>``), classes in sorted name order
    as torchvision's ImageFolder numbers them."""
    if source is None or source.kind != "folder":
        return None, None
    parts = [Path(str(i)).parts for i in ids]
    if any(len(p) < 2 for p in parts):
        raise DataError(
            f"{source.given}: some images are not in a class sub-folder; put every image in "
            "<folder>/<class>/ or pass labels explicitly"
        )
    names = sorted({p[0] for p in parts})
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[p[0]] for p in parts], dtype=np.int64), names


def _folder_captions(source: DataRef | None, ids: np.ndarray) -> list[str] | None:
    """Captions from every ``metadata.jsonl`` / ``metadata.csv`` under an image folder (the
    ``imagefolder`` layout: ``file_name`` relative to the metadata file's folder, ``text`` the
    caption)."""
    if source is None or source.kind != "folder":
        return None
    root = source.path
    files = sorted([*root.rglob("metadata.jsonl"), *root.rglob("metadata.csv")])
    if not files:
        return None
    captions: dict[str, str] = {}
    for meta in files:
        for name, text in _metadata_records(meta):
            captions[str((meta.parent / name).relative_to(root))] = text
    missing = [str(i) for i in ids if str(i) not in captions]
    if missing:
        raise DataError(
            f"{root}: {len(missing)} image(s) have no caption in {files[0].name} (first: "
            f"{missing[0]}); add them or drop the images"
        )
    return [captions[str(i)] for i in ids]


def _metadata_records(meta: Path) -> list[tuple[str, str]]:
    """(file_name, text) of each record of a ``metadata.jsonl`` or ``metadata.csv``."""
    if meta.suffix == ".csv":
        with meta.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"file_name", "text"} <= set(rows[0]):
            raise DataError(f"{meta}: needs the columns file_name and text (has {list(rows[0])})")
        return [(r["file_name"], r["text"]) for r in rows]
    out = []
    for lineno, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name, text = rec["file_name"], rec["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{meta}:{lineno}: each line must be a JSON object with file_name and text"
            ) from None
        if not isinstance(text, str):
            raise DataError(f"{meta}:{lineno}: text must be a string")
        out.append((name, text))
    return out
