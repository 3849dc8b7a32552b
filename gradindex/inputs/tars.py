"""WebDataset-style tar shards as a training source: ``data/{000..099}.tar``.

Each sample is the tar members sharing a key (the member path up to the first dot of its file
name, as WebDataset groups them): one image (``.png`` / ``.jpg`` ...), optionally a caption
(``.txt``) and a class label (``.cls``). The key is the sample's id.

Read with the standard library's ``tarfile``, not the ``webdataset`` package: listing a shard
reads only its 512-byte headers (``tarfile`` seeks past the data) and a row range then seeks to
its members' bytes, so each process reads only its own rows; ``webdataset`` streams every shard
from its start (benchmarks/bench_data.py measures both).
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gradindex.errors import DataError
from gradindex.inputs.files import IMAGE_SUFFIXES
from gradindex.inputs.pixels import decode_image
from gradindex.inputs.sources import DataSource

CAPTION_EXT = ".txt"
LABEL_EXT = ".cls"


def expand_braces(pattern: str) -> list[str]:
    """``a{000..002}.tar`` → a000.tar a001.tar a002.tar; ``{x,y}`` lists too (as in bash,
    zero padding kept)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


class TarSource(DataSource):
    """Samples of tar shards in shard order, member order within a shard."""

    decodes = True

    def __init__(self, pattern: str, channels: int | None, skip_bad: bool = False):
        super().__init__()
        self.name, self.channels = pattern, channels or 3
        self.paths = [Path(p) for p in expand_braces(pattern)]
        missing = [str(p) for p in self.paths if not p.exists()]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{missing[0]}: no such tar shard{more}")
        keys, where, texts, classes = [], [], [], []
        for t, path in enumerate(self.paths):
            for key, (offset, size, _ext), text, cls in _list_shard(path, skip_bad, self.skipped):
                keys.append(key)
                where.append((t, offset, size))
                texts.append(text)
                classes.append(cls)
        if not keys:
            raise DataError(f"{pattern}: no samples with an image member found")
        self.ids = np.array(keys)
        if len(np.unique(self.ids)) != len(keys):
            raise DataError(f"{pattern}: sample keys repeat across shards; keys are the ids")
        self.where = np.array(where, dtype=np.int64)  # [N, 3]: shard, offset, size
        self.prompts = self._all_or_none(texts, "prompts", CAPTION_EXT)
        labels = self._all_or_none(classes, "labels", LABEL_EXT)
        self.labels = None if labels is None else self._labels(labels)
        self._files: dict[int, BinaryIO] = {}

    def _all_or_none(self, values: list[str | None], what: str, ext: str) -> list[str] | None:
        """A member every sample has; when only some have it, None, and the first sample
        without it is named if the build asks for it (``missing``)."""
        lacking = [i for i, v in enumerate(values) if v is None]
        if len(lacking) == len(values):
            return None
        if lacking:
            self.missing[what] = f"sample {self.ids[lacking[0]]} has no {ext} member"
            return None
        return values  # type: ignore[return-value]

    def _labels(self, texts: list[str]) -> np.ndarray:
        try:
            return np.array([int(s.strip()) for s in texts], dtype=np.int64)
        except ValueError:
            bad = next(k for k, s in zip(self.ids, texts, strict=True) if not _is_int(s))
            raise DataError(f"{self.name}: sample {bad}: {LABEL_EXT} is not an integer") from None

    def _row(self, i: int) -> np.ndarray:
        t, offset, size = (int(v) for v in self.where[i])
        f = self._files.get(t) or self._files.setdefault(t, open(self.paths[t], "rb"))  # noqa: SIM115
        f.seek(offset)
        data = f.read(size)
        self.bytes_read += len(data)
        name = f"{self.paths[t]}: sample {self.ids[i]}"
        if len(data) < size:
            raise DataError(f"{name}: truncated ({len(data)} of {size} bytes); re-create the shard")
        return decode_image(io.BytesIO(data), name, self.channels)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _list_shard(path: Path, skip_bad: bool, skipped: list[tuple[str, str]]):
    """(key, (data offset, size, ext) of its image, caption, label text) per sample of one
    shard, from the headers; a member whose data runs past the end of the file is named."""
    size_on_disk = path.stat().st_size
    samples: dict[str, dict[str, object]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in _members(tf, path, size_on_disk):
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                rec = samples.setdefault(key, {})
                if m.offset_data + m.size > size_on_disk:
                    rec["bad"] = (
                        f"{m.name} truncated ({size_on_disk - m.offset_data} of {m.size} bytes)"
                    )
                elif ext.lower() in IMAGE_SUFFIXES:
                    rec["image"] = (m.offset_data, m.size, ext)
                elif ext in (CAPTION_EXT, LABEL_EXT):
                    rec[ext] = tf.extractfile(m).read().decode("utf-8")
    except tarfile.ReadError as exc:
        raise DataError(f"{path}: not a readable tar file ({exc})") from None
    for key, rec in samples.items():
        why = rec.get("bad") or (None if "image" in rec else "no image member")
        if why is not None:
            if not skip_bad:
                raise DataError(f"{path}: sample {key}: {why}; fix the shard or skip bad samples")
            skipped.append((key, f"{path}: {why}"))
            continue
        yield key, rec["image"], rec.get(CAPTION_EXT), rec.get(LABEL_EXT)


def _members(tf: tarfile.TarFile, path: Path, size_on_disk: int):
    """The members. The file ending inside the last one's data ends the listing there (that
    member is then named as truncated); any other damage is a DataError naming where."""
    last = None
    while True:
        try:
            m = tf.next()
        except tarfile.ReadError as exc:
            if last is not None and last.offset_data + last.size > size_on_disk:
                return
            after = f" after member {last.name}" if last else ""
            raise DataError(f"{path}: damaged tar{after} ({exc}); re-create the shard") from None
        if m is None:
            return
        last = m
        yield m


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's grouping: key = path up to the first dot of the file name, ext the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _is_int(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True
