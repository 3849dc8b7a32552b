"""Image files on disk, before any pixel is decoded: the files of a folder (``image_files``),
one file's mode and size from its header (``image_header``), and the checks that refuse a
decompression bomb from its header alone (``check_pixels``, ``check_npy_header``).

Why a module of its own: opening a folder of 10^6-10^8 small images is dominated by these two,
per file, in every process that opens it (a build, each shard, serve), so both avoid building
Python objects they do not need. Decoding pixels is ``gradindex.inputs.pixels.decode_image``.

Also the numpy array files (``read_array``, ``read_npz``, ``read_npz_data``): read without ever
unpickling, broken or pickled files a one-line DataError (``array_file_errors``).
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gradindex.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_files(folder: Path) -> list[str]:
    """The image files under ``folder`` (sub-folders too, symlinked folders not followed) as
    sorted relative paths. One ``os.scandir`` per folder, not ``rglob``, which builds a Path
    and stats each file."""
    found, todo = [], [(str(folder), "")]
    while todo:
        where, rel = todo.pop()
        try:
            with os.scandir(where) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        todo.append((e.path, rel + e.name + os.sep))
                    elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file():
                        found.append(rel + e.name)
        except OSError as exc:  # an unreadable sub-folder: never silently fewer rows
            raise DataError(f"{where}: cannot list it ({exc.strerror or exc})") from None
    return sorted(found)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_header(path: str | os.PathLike[str]) -> tuple[str, tuple[int, int]]:
    """(PIL mode, (H, W)) of an image file, from its header; OSError when it is no readable
    image. A PNG's comes from its first 33 bytes (the IHDR chunk, CRC checked) through PIL's
    own table of modes, without ``Image.open``'s plugin dispatch, which is most of the time of
    opening a folder of small images. Other formats go through ``Image.open``."""
    from PIL import Image, PngImagePlugin

    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) == 33 and head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height, depth, color = struct.unpack(">IIBB", head[16:26])
        mode = getattr(PngImagePlugin, "_MODES", {}).get((depth, color))
        if (
            mode
            and width
            and height
            and zlib.crc32(head[12:29]) == struct.unpack(">I", head[29:])[0]
        ):
            return mode[0], (height, width)
    try:
        with Image.open(path) as im:  # other formats, and any PNG the table does not cover
            return im.mode, (im.size[1], im.size[0])
    except (Image.DecompressionBombError, ValueError) as exc:  # past PIL's pixel / text limits
        raise OSError(str(exc).rstrip(".")) from None


MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default: ~ a 9459 x 9459 image


def check_pixels(name: str, width: int, height: int, limit: int = MAX_PIXELS) -> None:
    """Refuse an image whose header declares more than ``limit`` pixels, before decoding it
    (a 900-megapixel PNG of a few kB would take gigabytes)."""
    if width * height > limit:
        raise DataError(
            f"{name}: {width}x{height} pixels is more than the limit of {limit:,}; "
            "downscale it first"
        )


def check_npy_header(f: BinaryIO, total: int, name: str) -> None:
    """Refuse a ``.npy`` whose header declares more data than the ``total`` bytes it holds
    (or objects), before numpy allocates the declared array; ``f`` is left after the header."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(f)
        read = (
            npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    except (ValueError, EOFError, SyntaxError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}: not a readable .npy of numbers ({first})") from None
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it with its own message
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared != total - f.tell():
        raise DataError(
            f"{name}: its header declares {tuple(shape)} {dtype} ({declared:.3g} bytes) but the "
            f"file holds {total - f.tell()} bytes of data; a damaged or forged .npy"
        )


# the arrays of an .npz data file besides its images: class labels, captions (either name)
_NPZ_COLUMNS = {"labels": ("labels",), "captions": ("captions", "text")}


def read_npz_data(
    path: str | os.PathLike[str], columns: Sequence[str] = ("images",)
) -> dict[str, np.ndarray]:
    """The ``columns`` of an ``.npz`` data file, from one open: ``images`` (the array named so,
    or its only one), ``labels``, ``captions`` (or ``text``), those present. Only the arrays
    asked for are read (a broken labels array never stops reading the images); never
    unpickles."""
    p = Path(path)
    with array_file_errors(p), np.load(p, allow_pickle=False) as z:
        names = list(z.keys())
        arrays = {}
        if "images" in columns:
            if "images" not in names and len(names) != 1:
                raise DataError(f"{p}: holds arrays {names}; name the array 'images'")
            arrays["images"] = z["images" if "images" in names else names[0]]
        for column in columns:
            key = next((k for k in _NPZ_COLUMNS.get(column, ()) if k in names), None)
            if key is not None and len(names) > 1:
                arrays[column] = z[key]
    return arrays


def read_array(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """The array of a ``.npy`` file, or of a ``.npz`` file (its ``key`` array, or its only
    one). Never unpickles: object arrays and broken files are a one-line DataError."""
    p = Path(path)
    if p.suffix != ".npz":
        with array_file_errors(p), open(p, "rb") as f:
            check_npy_header(f, os.fstat(f.fileno()).st_size, str(p))  # before allocating
            f.seek(0)
            return np.load(f, allow_pickle=False)
    with array_file_errors(p), np.load(p, allow_pickle=False) as z:
        keys = list(z.keys())
        if key not in keys and len(keys) != 1:
            raise DataError(f"{p}: holds arrays {keys}; name the array {key!r}")
        return z[key if key in keys else keys[0]]


def read_npz(path: str | os.PathLike[str], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file (each must be there), never unpickled."""
    p = Path(path)
    with array_file_errors(p), np.load(p, allow_pickle=False) as z:
        missing = [k for k in keys if k not in z]
        if missing:
            raise DataError(f"{p}: no array named {', '.join(missing)} (has: {', '.join(z)})")
        return {k: z[k] for k in keys}


@contextmanager
def array_file_errors(path: Path) -> Iterator[None]:
    """numpy's errors on object arrays, pickles and broken files → one-line DataError."""
    try:
        yield
    except DataError:  # already says what is wrong (a ValueError too)
        raise
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: {_array_file_problem(exc, path)}") from None


def _array_file_problem(exc: Exception, path: Path) -> str:
    text = str(exc)
    if "pickled" in text and not _numpy_magic(path):  # numpy takes any other file for a pickle
        return "not a numpy array file (no .npy or .npz header); save the images with np.save"
    if "allow_pickle" in text or "pickled" in text:
        return (
            "holds Python objects (an object-dtype or pickled array), which are never "
            "unpickled; save plain numbers or strings (e.g. np.stack(images).astype(np.float32))"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"not a readable numpy array file ({first})"


def _numpy_magic(path: Path) -> bool:
    """Whether the file starts as a ``.npy`` does (or as an ``.npz``: a zip)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return True  # unreadable: the error numpy gave stands
    return head == b"\x93NUMPY" or head.startswith(b"PK")
