"""Conditioning that travels with the images: class labels and text prompts, read from the data.

Holds:
- ``conditioning_kind(model)``: "none", "class" (a ``UNet2DModel`` with ``num_class_embeds``)
  or "text" (a ``UNet2DConditionModel``, cross-attending to a text encoder's hidden states).
- ``load_conditioning(source, ids, n, kind, labels=, prompts=)``: per-row labels / captions of a
  data set — given as arguments, as ``labels`` / ``captions`` arrays of an ``.npz``, as class
  sub-folders of an image folder, or as ``metadata.jsonl`` / ``metadata.csv`` (``file_name``,
  ``text``: the ``imagefolder`` layout diffusers' text_to_image example reads).
- ``read_inputs(source, channels, kind, labels=, prompts=)``: images, ids and their labels /
  captions from one data source, each read once (an ``.npz`` is opened once for all three):
  what a build reads; ``query_inputs``: the same for query images, whose labels / captions are
  optional and whose class sub-folders are named, not numbered (the index numbers them).
- ``read_labels_file`` / ``read_prompts_file``: one label / prompt per line (CLI ``--labels``,
  ``--prompts``, ``--prompt-file``).

What the model is then given for them: ``gradindex.inputs.conditioner``.
"""

from __future__ import annotations

import csv
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
from gradindex.inputs.data import array_file_errors, load_images, read_array

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


@dataclass
class Inputs:
    """Images with their ids and labels / captions, read from one data source."""

    images: np.ndarray  # [N, C, H, W], dtype as stored
    ids: np.ndarray  # row numbers, or file names relative to an image folder
    cond: ConditioningData


def read_inputs(
    source: Any,
    channels: int | None,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
    fit: Any = None,
) -> Inputs:
    """The images of ``source`` (``load_images``) and the labels / captions a model of
    conditioning ``kind`` needs (``load_conditioning``), reading the source once: an ``.npz``
    is opened once for its images, labels and captions."""
    given = labels is not None or prompts is not None  # then the file's are not read
    arrays = _npz_arrays(source, () if given else _NPZ_KEYS.get(kind, ()))
    if arrays is None:
        images, ids = load_images(source, channels, fit)
    else:  # the labels / captions read with the images stand in for the file's
        images, ids = load_images(arrays["images"], channels)
        found, source = arrays.get("conditioning"), None
        if found is not None:
            labels, prompts = (found, None) if kind == "class" else (None, found.tolist())
    cond = load_conditioning(source, ids, len(images), kind, labels, prompts, required)
    return Inputs(images, ids, cond)


def query_inputs(
    source: Any,
    channels: int | None,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    fit: Any = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Query images, their names and the ``labels`` / ``prompts`` arguments of
    ``AttributionIndex.embed``: the given ones, else what ``source`` carries (as a build reads
    its data), else none (``embed`` then says what to pass). Labels from class sub-folders come
    as the sub-folder names: a query folder may hold only some classes, so its own numbering
    is not the index's, which ``embed`` maps the names to. fit: each image of a folder
    prepared as the index's training images were (``inputs.prepare``)."""
    given = labels is not None or prompts is not None
    found = read_inputs(source, channels, "none" if given else kind, required=False, fit=fit)
    cond = {"labels": labels, "prompts": prompts}
    if not given and kind != "none":
        cond = {"labels": found.cond.labels, "prompts": found.cond.prompts}
        if found.cond.class_names is not None:  # sub-folder names → the index's class numbers
            cond["labels"] = [found.cond.class_names[i] for i in found.cond.labels]
    return found.images, found.ids, cond


def read_labels_file(path: str | os.PathLike[str]) -> Any:
    """Class labels from a file: a ``.npy`` array, or text with one label per line (integers,
    or class names of an index built from class sub-folders)."""
    if str(path).endswith(".npy"):
        return read_array(path)
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [int(ln) if ln.lstrip("-").isdigit() else ln for ln in lines]


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped, the rest kept as written)."""
    return [ln for ln in Path(path).read_text().splitlines() if ln.strip()]


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
            labels = _npz_array(source, _NPZ_KEYS["class"])
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
            arr = _npz_array(source, _NPZ_KEYS["text"])
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


# the arrays of an .npz data file that hold a model's labels / captions, by conditioning kind
_NPZ_KEYS = {"none": (), "class": ("labels",), "text": ("captions", "text")}


def _npz_arrays(source: Any, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The images (as ``load_images`` picks them) and, as "conditioning", the first of ``keys``
    present of an ``.npz`` data file, from one open; None for any other source."""
    if not isinstance(source, (str, os.PathLike)) or Path(source).suffix != ".npz":
        return None
    path = Path(source)
    with array_file_errors(path), np.load(path, allow_pickle=False) as z:
        names = list(z.keys())
        if "images" not in names and len(names) != 1:
            raise DataError(f"{path}: holds arrays {names}; name the array 'images'")
        arrays = {"images": z["images" if "images" in names else names[0]]}
        key = next((k for k in keys if k in names), None)
        if key is not None:
            arrays["conditioning"] = z[key]
    return arrays


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
    """Captions from every ``metadata.jsonl`` / ``metadata.csv`` under an image folder (the
    ``imagefolder`` layout: ``file_name`` relative to the metadata file's folder, ``text`` the
    caption)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    root = Path(source)
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
