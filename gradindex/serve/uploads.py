"""What the browser sends: query images (PNG / JPEG, or a .npy of several) and results files
(``gradindex query --output results.jsonl``), decoded in memory with limits. Every problem is
an ``UploadError`` whose one line the page shows."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import DataError, GradIndexError
from gradindex.inputs.files import check_npy_header, check_pixels
from gradindex.inputs.query_images import load_images
from gradindex.serve.limits import Limits


class UploadError(GradIndexError):
    """A bad upload: shown on the page, never a stack trace."""


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"


def decode_images(data: bytes, filename: str, channels: int, limits: Limits) -> np.ndarray:
    """Upload bytes → images [B, C, H, W] (uint8 for PNG / JPEG; a .npy's own dtype)."""
    name = filename or "upload"
    if not data:
        raise UploadError("no file was uploaded: pick a PNG or JPEG image, or a .npy of images")
    if data.startswith(NPY_MAGIC):
        return _decode_npy(data, name, limits)
    if data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        return _decode_picture(data, name, channels, limits)
    raise UploadError(f"{name}: not a PNG, JPEG or .npy file; upload one of those")


def _decode_picture(data: bytes, name: str, channels: int, limits: Limits) -> np.ndarray:
    """The size from the header first (a decompression bomb is refused undecoded), then the
    pixels as ``gradindex query FILE`` reads them (``load_images``: 16-bit, alpha, palette)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(name, *im.size, limit=limits.max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(f"{name}: {str(exc).rstrip('.')}; downscale it first") from None
    except DataError as exc:
        raise UploadError(str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:  # ValueError:
        raise UploadError(f"{name}: not a readable image ({exc})") from None  # text chunk bombs
    suffix = ".png" if data.startswith(PNG_MAGIC) else ".jpg"
    with tempfile.TemporaryDirectory(prefix="gradindex-serve-") as tmp:
        path = Path(tmp) / f"upload{suffix}"  # our own name: nothing from the request
        path.write_bytes(data)
        try:
            return load_images(str(path), channels)[0]
        except GradIndexError as exc:
            raise UploadError(f"{name}: {str(exc).removeprefix(str(path) + ': ')}") from None


def _decode_npy(data: bytes, name: str, limits: Limits) -> np.ndarray:
    try:  # the header's declared size against the bytes sent, before numpy allocates it
        check_npy_header(io.BytesIO(data), len(data), name)
    except DataError as exc:
        raise UploadError(str(exc)) from None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UploadError(f"{name}: not a readable .npy of numbers ({first})") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr[None]  # one [C, H, W] image
    try:
        images = load_images(arr)[0]
    except GradIndexError as exc:
        raise UploadError(f"{name}: {exc}") from None
    if len(images) > limits.max_images:
        raise UploadError(
            f"{name}: {len(images)} images; at most {limits.max_images} per upload "
            "(query more with 'gradindex query ... --output results.jsonl' and view the file)"
        )
    if images.shape[-1] * images.shape[-2] > limits.max_pixels:
        raise UploadError(f"{name}: images of {images.shape[-1]}x{images.shape[-2]} are too large")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise UploadError(f"{name}: holds NaN or infinite pixel values")
    return images


def parse_results(text: str, name: str, ids: np.ndarray, limits: Limits) -> list[dict[str, Any]]:
    """A ``query --output`` .jsonl → one entry per query, in file order:
    {"query": name, "methods": {method: [(rank, row, id, score), ...]}}. Rows are checked
    against the index (a file of another index is refused, not shown with wrong images)."""
    queries: dict[str, dict[str, Any]] = {}
    num_rows = len(ids)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise UploadError(f"{name}: empty; give a file written by 'gradindex query --output'")
    if len(lines) > limits.max_results:
        raise UploadError(f"{name}: {len(lines)} records; at most {limits.max_results}")
    for n, line in enumerate(lines, 1):
        rec = _record(line, name, n)
        rows = rec["rows"]
        if any(not isinstance(r, int) or r < -1 or r >= num_rows for r in rows):
            raise UploadError(
                f"{name} line {n}: rows outside this index's 0..{num_rows - 1}; "
                "is it the results of another index?"
            )
        if any(r >= 0 and str(_plain(ids[r])) != str(i) for r, i in zip(rows, rec["ids"])):
            raise UploadError(
                f"{name} line {n}: its ids differ from this index's ids at those rows; "
                "is it the results of another index?"
            )
        key = str(rec.get("query", n))
        entry = queries.setdefault(key, {"query": key, "methods": {}})
        entry["methods"][rec["method"]] = [
            (rank, r, i, float(s))
            for rank, (r, i, s) in enumerate(zip(rows, rec["ids"], rec["scores"], strict=True), 1)
            if r >= 0
        ]
    return list(queries.values())


def _record(line: str, name: str, n: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError:
        raise UploadError(f"{name} line {n}: not JSON (a .jsonl from 'gradindex query')") from None
    need = ("method", "rows", "ids", "scores")
    if not isinstance(rec, dict) or any(k not in rec for k in need):
        raise UploadError(f"{name} line {n}: needs the keys {', '.join(need)}")
    if not all(isinstance(rec[k], list) for k in need[1:]) or not (
        len(rec["rows"]) == len(rec["ids"]) == len(rec["scores"])
    ):
        raise UploadError(f"{name} line {n}: rows, ids and scores must be lists of one length")
    if not isinstance(rec["method"], str):
        raise UploadError(f"{name} line {n}: method must be a name")
    return rec


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x
