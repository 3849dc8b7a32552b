"""Seeded random projections R^p -> R^d that compress per-sample gradient vectors.

Holds:

- ``PROJECTIONS``: the standalone projection kinds (``spec.SPEC_PROJECTIONS`` less 'kronecker').
- ``Projector``: the seam; one seeded linear map with ``E[<Px, Py>] = <x, y>`` and one method,
  ``project(x)``.
- ``IdentityProjector``, ``GaussianProjector``, ``SJLTProjector``: the three kinds.
- ``make_projector``: validates the arguments and builds one of them.

Every map is a pure function of (kind, seed, in_dim, out_dim, nnz): its random numbers come from
CPU ``torch.Generator`` objects and are moved to the device afterwards, so one seed gives the
same map on CPU and GPU and for every batch size (outputs agree up to float rounding). None of
them holds a dense p x d matrix unless it fits a small memory budget.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import logging
import math
import warnings

import numpy as np
import torch

from gradindex.errors import DataError, SpecError
from gradindex.spec import HOOK_PROJECTIONS, SPEC_PROJECTIONS

logger = logging.getLogger(__name__)

PROJECTIONS: tuple[str, ...] = tuple(p for p in SPEC_PROJECTIONS if p not in HOOK_PROJECTIONS)

# Input rows per seeded Gaussian block. Part of the map's definition (the block index seeds the
# generator), so changing it changes every gaussian projection ever stored.
GAUSSIAN_BLOCK_ROWS = 1 << 13
# Gaussian blocks are kept on the device when the whole p x d matrix fits in this many bytes;
# otherwise they are regenerated on every call (slow: that is the price of a dense projection).
GAUSSIAN_CACHE_BYTES = 256 * 1024**2
# Input coordinates per SJLT CSR chunk: a performance setting only (not part of the map); 2^15
# keeps a sample's slice of x (128 KB) in L2.
SJLT_CHUNK = 1 << 15
# SJLT maps whose expanded CSR (float32 values, int32 columns: 8 bytes per nonzero) fits in
# this many bytes keep it beside the compact form; larger ones expand one chunk at a time as
# they project (a slower projection in a quarter of the memory). Performance only: the same map.
SJLT_EXPANDED_BYTES = 256 * 2**20


def derived_seed(tag: str, *parts: int) -> int:
    """A 63-bit generator seed from a tag and integers; platform-independent, no collisions
    between different (tag, parts) in practice, unlike ``seed + block``."""
    text = ":".join([f"gradindex.featurize.projection.{tag}", *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an int, got {type(value).__name__}; {hint}")
    if value < minimum:
        raise SpecError(f"{name} must be >= {minimum}, got {value}; {hint}")
    return value


def _checked_device(device: str | torch.device) -> torch.device:
    """A torch.device with an explicit CUDA index, so it matches ``x.device`` as a cache key."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SpecError(
            f"device {device!r} is not a torch device; use e.g. 'cpu' or 'cuda'"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(
                f"device {str(device)!r} asked for but CUDA is not available; use 'cpu'"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class Projector(abc.ABC):
    """One seeded linear map R^in_dim -> R^out_dim with E[<Px, Py>] = <x, y>."""

    kind: str
    in_dim: int
    out_dim: int
    seed: int

    def __init__(self, in_dim: int, out_dim: int, seed: int) -> None:
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed

    @abc.abstractmethod
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_dim] float32 on any device -> [B, out_dim] float32 on the same device."""

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as float32 [B, in_dim]; other float dtypes are converted, anything else refused."""
        if not isinstance(x, torch.Tensor):
            raise DataError(
                f"x must be a torch.Tensor of shape [B, {self.in_dim}], got {type(x).__name__}"
            )
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise DataError(
                f"x must have shape [B, {self.in_dim}], got {list(x.shape)}; "
                "flatten each gradient to one row of in_dim values"
            )
        if not x.is_floating_point():
            raise DataError(f"x must be a floating-point tensor, got {x.dtype}; cast it to float32")
        return x.to(torch.float32)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(in_dim={self.in_dim}, out_dim={self.out_dim}, seed={self.seed})"
        )


class IdentityProjector(Projector):
    """No compression (out_dim == in_dim): exact scores, for small models and for tests."""

    kind = "identity"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked_input(x)  # [B, p], x itself when it is already float32


class GaussianProjector(Projector):
    """Dense map x -> x @ G with G[i, j] ~ N(0, 1/d), generated in seeded blocks of rows.

    Block b (input rows b*GAUSSIAN_BLOCK_ROWS ...) comes from a CPU generator seeded by
    (seed, b), so no p x d matrix is ever needed at once and every device sees the same numbers.
    Cost: p*d multiply-adds per vector plus regenerating p*d normals per call when the matrix
    exceeds GAUSSIAN_CACHE_BYTES. Use sjlt for large p.
    """

    kind = "gaussian"

    def __init__(self, in_dim: int, out_dim: int, seed: int, device: torch.device) -> None:
        super().__init__(in_dim, out_dim, seed)
        self._cacheable = in_dim * out_dim * 4 <= GAUSSIAN_CACHE_BYTES
        self._cache: dict[torch.device, list[torch.Tensor]] = {}
        if self._cacheable:
            self._blocks(device)
        else:
            logger.info(
                "gaussian %d x %d matrix exceeds %d MB: regenerating its blocks on every call",
                in_dim,
                out_dim,
                GAUSSIAN_CACHE_BYTES // 1024**2,
            )

    def _num_blocks(self) -> int:
        return -(-self.in_dim // GAUSSIAN_BLOCK_ROWS)

    def _block(self, b: int, device: torch.device) -> torch.Tensor:
        start = b * GAUSSIAN_BLOCK_ROWS
        rows = min(GAUSSIAN_BLOCK_ROWS, self.in_dim - start)
        gen = torch.Generator(device="cpu").manual_seed(derived_seed("gaussian", self.seed, b))
        block = torch.randn(rows, self.out_dim, generator=gen, dtype=torch.float32)  # [rows, d]
        return block.mul_(1.0 / math.sqrt(self.out_dim)).to(device)

    def _blocks(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = [self._block(b, device) for b in range(self._num_blocks())]
        return self._cache[device]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = self._checked_input(x)  # [B, p]
        out = torch.zeros(x.shape[0], self.out_dim, dtype=torch.float32, device=x.device)
        for b in range(self._num_blocks()):
            block = self._blocks(x.device)[b] if self._cacheable else self._block(b, x.device)
            start = b * GAUSSIAN_BLOCK_ROWS
            out.addmm_(x[:, start : start + block.shape[0]], block)  # [B, rows] @ [rows, d]
        return out  # [B, d]


@functools.lru_cache(maxsize=8)
def _sign_table(scale: float, device: torch.device) -> torch.Tensor:
    """[256, 8] float32: entry b of sign byte v (bit b set: negative) is ∓scale."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)).bitwise_and_(1).bool()
    plus = torch.tensor(scale, dtype=torch.float32)  # float32(scale), as the CSR always held
    return torch.where(bits, -plus, plus).to(device)


class _CompactCSR:
    """One SJLT chunk [d, n] as CSR with int16 columns (n <= 2^15) and one sign bit per entry;
    ``csr()`` expands it to the int32 / float32 CSR tensor torch multiplies, entries ±scale
    (kept expanded after ``keep()``: a small map's multiply then skips the expansion)."""

    def __init__(
        self, crow: np.ndarray, cols: np.ndarray, negative: np.ndarray, n: int, scale: float
    ) -> None:
        self.n, self.scale, self.entries = n, scale, len(cols)
        self.crow = torch.from_numpy(crow)  # [d + 1] int32
        self.cols = torch.from_numpy(cols)  # [entries] int16 (int32 for a chunk over 2^15)
        self.bits = torch.from_numpy(np.packbits(negative, bitorder="little"))  # [entries / 8]
        self.kept: torch.Tensor | None = None

    def keep(self) -> None:
        self.kept = self._expand()

    def to(self, device: torch.device) -> _CompactCSR:
        out = object.__new__(_CompactCSR)
        out.__dict__.update(self.__dict__)
        out.crow, out.cols, out.bits = (t.to(device) for t in (self.crow, self.cols, self.bits))
        out.kept = None if self.kept is None else out._expand()
        return out

    def nbytes(self) -> int:
        held = [self.crow, self.cols, self.bits]
        if self.kept is not None:
            held += [self.kept.crow_indices(), self.kept.col_indices(), self.kept.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def csr(self) -> torch.Tensor:
        """The chunk as a torch sparse CSR [d, n] float32 matrix."""
        return self.kept if self.kept is not None else self._expand()

    def _expand(self) -> torch.Tensor:
        table = _sign_table(self.scale, self.bits.device)  # byte → its 8 entries' values
        values = table.index_select(0, self.bits.int()).view(-1)[: self.entries]
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow,
                self.cols.to(torch.int32),
                values,
                (len(self.crow) - 1, self.n),
                check_invariants=False,
            )


class SJLTProjector(Projector):
    """Sparse Johnson-Lindenstrauss map: each input coordinate has exactly ``nnz`` nonzeros.

    Block construction: the d outputs are split into nnz contiguous blocks (sizes differ by at
    most one when nnz does not divide d); coordinate i gets one uniformly random row in each block
    with an independent random sign, value ±1/sqrt(nnz). Distinct rows make ||P e_i|| = 1 exactly
    and independent signs make E[P^T P] = I. Rows and signs are drawn over all p coordinates from
    one CPU generator, so the map depends only on (seed, p, d, nnz).

    Applied as CSR matrices M_k [d, SJLT_CHUNK] over consecutive chunks of input coordinates,
    sum_k M_k @ x[:, chunk_k]^T (MKL on CPU, cuSPARSE on GPU): O(p*nnz) per vector. Chunking keeps
    each sample's slice of x in cache while its nonzeros are gathered (one [d, p] CSR matrix or
    ``index_add_`` scattering do not; docs/build-speed.md).

    Kept compact (``_CompactCSR``): a chunk's columns as int16 and its signs as bits, expanded to
    the int32 / float32 CSR that torch multiplies one chunk at a time while projecting (the same
    matrix, so the same numbers); maps under ``SJLT_EXPANDED_BYTES`` keep the expanded form too.
    Memory above that: about p*nnz*2.1 bytes plus 4(d+1) bytes per chunk (p*nnz*8 expanded).
    """

    kind = "sjlt"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int,
        nnz: int,
        device: torch.device,
        breaks: tuple[int, ...] = (),
    ) -> None:
        super().__init__(in_dim, out_dim, seed)
        self.nnz = nnz
        chunks = self._build(breaks)
        if in_dim * nnz * 8 <= SJLT_EXPANDED_BYTES:
            for _, m in chunks:
                m.keep()
        self._starts = {start: j for j, (start, _) in enumerate(chunks)}
        self._recent: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self._cache: dict[torch.device, list[tuple[int, _CompactCSR]]] = {
            device: [(start, m.to(device)) for start, m in chunks]
        }

    def _build(self, breaks: tuple[int, ...] = ()) -> list[tuple[int, _CompactCSR]]:
        """(first input coordinate, M_k [d, n_k] with entries ±1/sqrt(nnz)) per chunk, on CPU.
        Chunks start every SJLT_CHUNK coordinates and at each of ``breaks`` (storage only: the
        map is the same), so ``add_columns`` can project any column range between breaks."""
        p, d, nnz = self.in_dim, self.out_dim, self.nnz
        sizes = [d // nnz + (j < d % nnz) for j in range(nnz)]  # output block sizes, sum d
        gen = torch.Generator(device="cpu").manual_seed(derived_seed("sjlt", self.seed))
        small = torch.int16 if d <= torch.iinfo(torch.int16).max else torch.int32  # half the bytes
        rows = torch.empty(nnz, p, dtype=small)  # output row of (block j, coordinate i)
        negative = torch.empty(nnz, p, dtype=torch.bool)
        offset = 0
        for j, size in enumerate(sizes):  # block j: one row in [offset, offset + size)
            rows[j] = torch.randint(0, size, (p,), generator=gen).add_(offset)
            negative[j] = torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8).bool()
            offset += size
        scale = 1.0 / math.sqrt(nnz)
        rows_np, negative_np = rows.numpy(), negative.numpy()
        key = np.uint16 if d <= 2**16 else np.int32  # 16-bit keys take numpy's O(n) radix sort
        chunks = []
        cuts = sorted({*range(0, p, SJLT_CHUNK), *(b for b in breaks if 0 < b < p)}) + [p]
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            n = stop - start
            r = rows_np[:, start : start + n].reshape(-1)  # [nnz*n], block-major
            # Stable sort by row; within a row all entries come from one block, columns ascending.
            order = np.argsort(r.astype(key), kind="stable")  # [nnz*n]
            crow = np.zeros(d + 1, dtype=np.int32)
            np.cumsum(np.bincount(r, minlength=d), out=crow[1:])
            signs = negative_np[:, start : start + n].reshape(-1)[order]
            cols = (order % n).astype(np.int16 if n <= 1 << 15 else np.int32)
            chunks.append((start, _CompactCSR(crow, cols, signs, n, scale)))
        return chunks

    def _chunks(self, device: torch.device) -> list[tuple[int, _CompactCSR]]:
        if device not in self._cache:
            source = next(iter(self._cache.values()))
            self._cache[device] = [(start, m.to(device)) for start, m in source]
        return self._cache[device]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = self._checked_input(x)  # [B, p]
        out = torch.zeros(self.out_dim, x.shape[0], dtype=torch.float32, device=x.device)  # [d, B]
        if x.shape[0] == 0:
            return out.T
        for start, m in self._chunks(x.device):
            out.addmm_(m.csr(), x[:, start : start + m.n].T)  # [d, n] @ [n, B]
        return out.T.contiguous()  # [B, d]

    def add_columns(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The projection of coordinates [start, start + n) alone: x [B, n] float32 → P[:, cols]
        x [d, B] (transposed: the caller sums these over column ranges). ``start`` and
        ``start + n`` must be chunk starts (the ``breaks`` the map was built with) or in_dim."""
        stop = start + x.shape[1]
        j = self._starts.get(start)
        if j is None or (stop != self.in_dim and stop not in self._starts):
            raise ValueError(f"columns [{start}, {stop}) do not fall on this map's chunks")
        out = torch.zeros(self.out_dim, x.shape[0], dtype=torch.float32, device=x.device)
        for a, m in self._range(x.device, j, stop):
            out.addmm_(m, x[:, a - start : a - start + m.shape[1]].T)  # [d, n_k] @ [n_k, B]
        return out

    def _range(self, device: torch.device, j: int, stop: int) -> list[tuple[int, torch.Tensor]]:
        """The expanded chunks from chunk j up to coordinate ``stop``; the last few ranges asked
        for are kept (one layer's weight and bias columns), as the streamed path projects a
        layer's items in parts."""
        key = (device, j, stop)
        if key not in self._recent:
            chunks, found = self._chunks(device), []
            while j < len(chunks) and chunks[j][0] < stop:
                found.append((chunks[j][0], chunks[j][1].csr()))
                j += 1
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))  # the oldest
            self._recent[key] = found
        return self._recent[key]

    def nbytes(self) -> int:
        """Bytes this map keeps (on its first device)."""
        return sum(m.nbytes() for _, m in next(iter(self._cache.values())))

    def __repr__(self) -> str:
        return (
            f"SJLTProjector(in_dim={self.in_dim}, out_dim={self.out_dim}, seed={self.seed}, "
            f"nnz={self.nnz})"
        )


def make_projector(
    kind: str,
    in_dim: int,
    out_dim: int,
    seed: int,
    *,
    nnz: int = 4,
    device: str | torch.device = "cpu",
    breaks: tuple[int, ...] = (),
) -> Projector:
    """Build the projector of ``kind`` (one of PROJECTIONS) from R^in_dim to R^out_dim.

    ``identity`` ignores ``out_dim`` (its output has in_dim columns); ``nnz`` (nonzeros per input
    coordinate) and ``breaks`` (column ranges ``SJLTProjector.add_columns`` projects alone) are
    used by ``sjlt`` only. ``device`` is where the projector's numbers are kept
    first; ``project`` accepts inputs on any device and returns on the input's device.
    """
    if not isinstance(kind, str) or kind not in PROJECTIONS:
        raise SpecError(f"projection kind must be one of {', '.join(PROJECTIONS)}; got {kind!r}")
    in_dim = _check_int("in_dim", in_dim, 1, "pass the number of gradient coordinates")
    seed = _check_int("seed", seed, 0, "pass a non-negative int seed")
    device = _checked_device(device)
    if kind == "identity":
        return IdentityProjector(in_dim, in_dim, seed)
    out_dim = _check_int("out_dim", out_dim, 1, "pass the projected dimension d, e.g. 4096")
    if kind == "gaussian":
        return GaussianProjector(in_dim, out_dim, seed, device)
    nnz = _check_int("nnz", nnz, 1, "pass the nonzeros per input coordinate, e.g. 4")
    if nnz > out_dim:
        raise SpecError(
            f"nnz must be <= out_dim ({out_dim}), got {nnz}; lower nnz or raise out_dim"
        )
    return SJLTProjector(in_dim, out_dim, seed, nnz, device, tuple(breaks))
