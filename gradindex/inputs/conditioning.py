"""Conditioning that travels with the images: class labels and text prompts, read from the data.

Holds:
- ``conditioning_kind(model)``: "none", "class" (a ``UNet2DModel`` with ``num_class_embeds``)
  or "text" (a ``UNet2DConditionModel``, cross-attending to a text encoder's hidden states).
- ``load_conditioning(source, ids, n, kind, labels=, prompts=)``: per-row labels / captions of a
  data set — given as arguments, as ``labels`` / ``captions`` arrays of an ``.npz``, as class
  sub-folders of an image folder, or as ``metadata.jsonl`` (``file_name``, ``text``: the
  layout diffusers' text_to_image example reads).

What the model is then given for them: ``gradindex.inputs.conditioner``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.errors import DataError, ModelError
from gradindex.inputs.data import array_file_errors

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
    source: Any,
    ids: np.ndarray,
    n: int,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
) -> ConditioningData:
    """The labels / captions of the ``n`` rows of ``source`` (ids as ``load_images`` gave them),
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
            labels = _npz_array(source, ("labels",))
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
            arr = _npz_array(source, ("captions", "text"))
            prompts = None if arr is None else arr.tolist()
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


def _npz_array(source: Any, keys: tuple[str, ...]) -> np.ndarray | None:
    if not isinstance(source, (str, os.PathLike)) or Path(source).suffix != ".npz":
        return None
    with array_file_errors(Path(source)), np.load(source, allow_pickle=False) as z:
        for key in keys:
            if key in z:
                return z[key]
    return None


def _folder_classes(source: Any, ids: np.ndarray) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from class sub-folders (``root/<class>/<image>``), classes in sorted name order
    as torchvision's ImageFolder numbers them."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None, None
    parts = [Path(str(i)).parts for i in ids]
    if any(len(p) < 2 for p in parts):
        raise DataError(
            f"{source}: some images are not in a class sub-folder; put every image in "
            "<folder>/<class>/ or pass labels explicitly"
        )
    names = sorted({p[0] for p in parts})
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[p[0]] for p in parts], dtype=np.int64), names


def _folder_captions(source: Any, ids: np.ndarray) -> list[str] | None:
    """Captions from every ``metadata.jsonl`` under an image folder (``file_name`` relative to
    the metadata file's folder, ``text`` the caption)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    root = Path(source)
    files = sorted(root.rglob("metadata.jsonl"))
    if not files:
        return None
    captions: dict[str, str] = {}
    for meta in files:
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
            captions[str((meta.parent / name).relative_to(root))] = text
    missing = [str(i) for i in ids if str(i) not in captions]
    if missing:
        raise DataError(
            f"{root}: {len(missing)} image(s) have no caption in metadata.jsonl (first: "
            f"{missing[0]}); add them or drop the images"
        )
    return [captions[str(i)] for i in ids]
