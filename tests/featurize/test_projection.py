"""Tests for gradindex.featurize.projection: projections against exact inner products and explicit matrices."""

from __future__ import annotations

import math

import pytest
import torch

from gradindex.errors import DataError, SpecError
from gradindex.featurize import projection
from gradindex.featurize.projection import PROJECTIONS, make_projector

RANDOM_KINDS = ("gaussian", "sjlt")


def _pair(p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated vectors [p] (cosine 0.6), so <x, y> is far from 0."""
    gen = torch.Generator().manual_seed(seed)
    x, z = torch.randn(2, p, generator=gen, dtype=torch.float64)
    y = 0.6 * x + 0.8 * z
    return x, y


def _matrix(proj: projection.Projector) -> torch.Tensor:
    """The explicit [p, d] matrix M of a projector (rows P e_i), so project(x) = x @ M."""
    return proj.project(torch.eye(proj.in_dim)).double()


@pytest.mark.parametrize(("kind", "d"), [("gaussian", 64), ("sjlt", 64), ("sjlt", 66)])
def test_unbiased_inner_product_and_norm(kind: str, d: int) -> None:
    """Over 200 seeds the mean of <Px, Py> and of ||Px||^2 is within 4 standard errors of exact
    (the mean of 200 draws is close to normal: a 4-SE miss has probability < 1e-4)."""
    p, n_seeds = 1001, 200
    x, y = _pair(p)
    xy = torch.stack([x, y]).float()  # [2, p]
    dots, sq = [], []
    for seed in range(n_seeds):
        px, py = make_projector(kind, p, d, seed).project(xy).double()  # [d] each
        dots.append(px @ py)
        sq.append(px @ px)
    for values, exact in ((torch.stack(dots), x @ y), (torch.stack(sq), x @ x)):
        se = values.std() / math.sqrt(n_seeds)
        # The estimator's std is ~ ||x|| ||y|| sqrt(2/d): the check is not vacuous.
        assert se < 0.25 * abs(exact)
        assert abs(values.mean() - exact) < 4 * se, (values.mean().item(), exact.item())
    if kind == "gaussian":
        # Var <Px, Py> = (||x||^2 ||y||^2 + <x, y>^2) / d exactly; sample variance within 30%.
        theory = ((x @ x) * (y @ y) + (x @ y) ** 2) / d
        assert 0.7 < torch.stack(dots).var() / theory < 1.3


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_johnson_lindenstrauss_norm_error(kind: str) -> None:
    """At d = 4096 each ||Px||^2 / ||x||^2 is within 4 sqrt(2/d) of 1 (4 sigma of chi^2_d / d;
    sparse JL with block construction has variance <= 2/d as well)."""
    p, d = 3337, 4096
    gen = torch.Generator().manual_seed(2)
    x = torch.cat(
        [
            torch.randn(4, p, generator=gen),  # dense
            # heavy-tailed: log-normal scales, a few coordinates dominate
            torch.randn(2, p, generator=gen) * torch.randn(2, p, generator=gen).mul(1.5).exp(),
            torch.rand(2, p, generator=gen),  # all-positive (no sign cancellation)
        ]
    )  # [8, p]
    bound = 4 * math.sqrt(2 / d)
    for seed in range(4):
        px = make_projector(kind, p, d, seed).project(x).double()
        ratio = (px * px).sum(1) / (x.double() ** 2).sum(1)  # [8]
        assert (ratio - 1).abs().max() < bound, ratio


def test_gaussian_equals_explicit_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocked projection (odd block size, partial last block) equals x @ M for the matrix M built
    independently from the (seed, block) definition; entries have mean 0 and variance 1/d."""
    monkeypatch.setattr(projection, "GAUSSIAN_BLOCK_ROWS", 97)
    p, d, seed = 1001, 48, 5
    proj = make_projector("gaussian", p, d, seed)
    m = _matrix(proj)  # [p, d]
    blocks = []
    for b, start in enumerate(range(0, p, 97)):
        gen = torch.Generator().manual_seed(projection.derived_seed("gaussian", seed, b))
        blocks.append(torch.randn(min(97, p - start), d, generator=gen) / math.sqrt(d))
    torch.testing.assert_close(m, torch.cat(blocks).double(), rtol=0, atol=1e-7)

    x = torch.randn(7, p, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(proj.project(x).double(), x.double() @ m, rtol=1e-5, atol=1e-5)
    n = m.numel()
    assert abs(m.mean()) < 4 * math.sqrt(1 / d / n)
    assert abs(m.var() * d - 1) < 4 * math.sqrt(2 / n)  # sample variance, relative SE sqrt(2/n)

    # Without the cache (matrix over the memory budget) the blocks are regenerated identically.
    monkeypatch.setattr(projection, "GAUSSIAN_CACHE_BYTES", 0)
    uncached = make_projector("gaussian", p, d, seed)
    assert not uncached._cache
    assert torch.equal(uncached.project(x), proj.project(x))


@pytest.mark.parametrize(("d", "nnz"), [(64, 4), (66, 4), (37, 3), (50, 1), (8, 8)])
def test_sjlt_structure(d: int, nnz: int) -> None:
    """P e_i has exactly nnz nonzeros of magnitude 1/sqrt(nnz), one per output block, so
    ||P e_i|| = 1; signs are balanced."""
    p = 1001
    m = _matrix(make_projector("sjlt", p, d, 11, nnz=nnz)).float()  # [p, d]
    nonzero = m != 0
    assert torch.equal(nonzero.sum(1), torch.full((p,), nnz))
    assert torch.equal(m[nonzero].abs(), torch.full((p * nnz,), 1 / math.sqrt(nnz)))
    torch.testing.assert_close(m.double().norm(dim=1), torch.ones(p, dtype=torch.float64))
    sizes = [d // nnz + (j < d % nnz) for j in range(nnz)]
    for block in nonzero.split(sizes, dim=1):
        assert torch.equal(block.sum(1), torch.ones(p, dtype=torch.long))
    negative = (m < 0).sum().item() / (p * nnz)
    assert abs(negative - 0.5) < 4 * math.sqrt(0.25 / (p * nnz))


@pytest.mark.parametrize(
    ("p", "d", "nnz", "seed"), [(1001, 64, 4, 3), (300, 37, 3, 0), (50, 70001, 2, 9)]
)
def test_sjlt_map_is_the_documented_draw(p: int, d: int, nnz: int, seed: int) -> None:
    """The map is fixed by (seed, p, d, nnz) as documented: block j's rows and signs are the
    next two randint draws of one CPU generator. Stored indexes depend on this map, so any
    change to how it is built (sorting, chunking, dtypes) must leave it equal to this."""
    gen = torch.Generator().manual_seed(projection.derived_seed("sjlt", seed))
    expected = torch.zeros(p, d, dtype=torch.float64)
    offset = 0
    for j in range(nnz):
        size = d // nnz + (j < d % nnz)
        rows = torch.randint(0, size, (p,), generator=gen) + offset
        negative = torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8).bool()
        value = torch.where(negative, -1.0, 1.0) / math.sqrt(nnz)  # float32, as stored
        expected[torch.arange(p), rows] = value.double()
        offset += size
    assert torch.equal(_matrix(make_projector("sjlt", p, d, seed, nnz=nnz)), expected)


@pytest.mark.parametrize(("expanded_bytes", "chunk"), [(0, 97), (0, 1 << 16), (1 << 30, 97)])
def test_compact_sjlt_projects_as_the_dense_map(
    monkeypatch: pytest.MonkeyPatch, expanded_bytes: int, chunk: int
) -> None:
    """A map kept compact (int16 columns, sign bits; int32 columns for a chunk over 2^15) or
    expanded projects x, whole and by column ranges, as x @ M with M the documented draw
    built densely here (so indexes built with the float32 / int32 CSR open and query alike)."""
    p, d, nnz, seed = 70001, 48, 3, 5
    gen = torch.Generator().manual_seed(projection.derived_seed("sjlt", seed))
    m = torch.zeros(p, d, dtype=torch.float64)
    offset = 0
    for j in range(nnz):
        size = d // nnz + (j < d % nnz)
        rows = torch.randint(0, size, (p,), generator=gen) + offset
        negative = torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8).bool()
        m[torch.arange(p), rows] = torch.where(negative, -1.0, 1.0).double() / math.sqrt(nnz)
        offset += size
    monkeypatch.setattr(projection, "SJLT_EXPANDED_BYTES", expanded_bytes)
    monkeypatch.setattr(projection, "SJLT_CHUNK", chunk)
    proj = make_projector("sjlt", p, d, seed, nnz=nnz, breaks=(1000, 50000))
    x = torch.randn(4, p, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ m
    torch.testing.assert_close(proj.project(x).double(), exact, rtol=1e-4, atol=1e-4)
    parts = proj.add_columns(x[:, :1000], 0) + proj.add_columns(x[:, 1000:50000], 1000)
    parts += proj.add_columns(x[:, 50000:], 50000)
    torch.testing.assert_close(parts.T.double(), exact, rtol=1e-4, atol=1e-4)


def test_large_sjlt_map_is_kept_compact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above SJLT_EXPANDED_BYTES the map holds about 2.1 bytes per nonzero (int16 column, sign
    bit), not 8 (float32 value, int32 column): 0.30 GB instead of 1.14 GB at 35.7M
    parameters."""
    p, d, nnz = 300_000, 4096, 4
    monkeypatch.setattr(projection, "SJLT_EXPANDED_BYTES", p * nnz * 8 - 1)
    proj = make_projector("sjlt", p, d, 0, nnz=nnz)
    assert isinstance(proj, projection.SJLTProjector)
    chunks = math.ceil(p / projection.SJLT_CHUNK)
    assert proj.nbytes() <= p * nnz * 2.125 + chunks * 4 * (d + 1) + 64 * chunks
    small = make_projector("sjlt", p, d, 0, nnz=nnz, breaks=())
    monkeypatch.setattr(projection, "SJLT_EXPANDED_BYTES", p * nnz * 8)
    kept = make_projector("sjlt", p, d, 0, nnz=nnz)
    assert kept.nbytes() > p * nnz * 8  # small maps keep the fast expanded form as well
    x = torch.randn(3, p, generator=torch.Generator().manual_seed(2))
    assert torch.equal(small.project(x), kept.project(x))


def test_sjlt_chunking_is_not_part_of_the_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small odd CSR chunks give the same map as one chunk, and project(x) equals x @ M."""
    p, d = 1001, 40
    whole = make_projector("sjlt", p, d, 4)
    monkeypatch.setattr(projection, "SJLT_CHUNK", 97)
    chunked = make_projector("sjlt", p, d, 4)
    assert len(chunked._chunks(torch.device("cpu"))) == math.ceil(p / 97)
    m = _matrix(whole)
    assert torch.equal(_matrix(chunked), m)
    x = torch.randn(5, p, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(chunked.project(x).double(), x.double() @ m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_deterministic_and_batch_invariant(kind: str) -> None:
    p, d = 1001, 32
    x = torch.randn(6, p, generator=torch.Generator().manual_seed(9))
    out = make_projector(kind, p, d, 7).project(x)
    assert out.dtype == torch.float32 and out.device == x.device
    assert out.shape == (6, p if kind == "identity" else d)
    assert torch.equal(make_projector(kind, p, d, 7).project(x), out)
    proj = make_projector(kind, p, d, 7)
    scale = out.abs().max().item()  # float32 rounding of a p-term sum is relative to this
    for i in range(6):
        torch.testing.assert_close(proj.project(x[i : i + 1])[0], out[i], rtol=0, atol=1e-5 * scale)
    assert proj.project(x[:0]).shape == (0, out.shape[1])
    if kind != "identity":
        assert not torch.allclose(make_projector(kind, p, d, 8).project(x), out, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", PROJECTIONS)
def test_same_numbers_on_cpu_and_gpu(kind: str) -> None:
    p, d = 3337, 64
    x = torch.randn(4, p, generator=torch.Generator().manual_seed(10))
    cpu = make_projector(kind, p, d, 3).project(x)
    gpu = make_projector(kind, p, d, 3, device="cuda").project(x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    # A CPU-built projector also accepts GPU input.
    torch.testing.assert_close(
        make_projector(kind, p, d, 3).project(x.cuda()).cpu(), cpu, rtol=1e-5, atol=1e-5
    )


def test_identity_returns_x_and_ignores_out_dim() -> None:
    x = torch.randn(3, 17)
    proj = make_projector("identity", 17, 5, 0)
    assert proj.out_dim == 17
    assert proj.project(x) is x
    x64 = x.double()
    assert torch.equal(proj.project(x64), x64.float())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "dense"}, "kind"),
        ({"in_dim": 0}, "in_dim"),
        ({"in_dim": 10.0}, "in_dim"),
        ({"out_dim": 0}, "out_dim"),
        ({"out_dim": -3}, "out_dim"),
        ({"out_dim": True}, "out_dim"),
        ({"in_dim": True}, "in_dim must be an int, got bool"),
        ({"seed": False}, "seed must be an int, got bool"),
        ({"nnz": 0}, "nnz"),
        ({"nnz": 17}, "nnz"),
        ({"seed": -1}, "seed"),
        ({"kind": "gaussian", "out_dim": 0}, "out_dim"),
        ({"device": "nonsense"}, "device"),
    ],
)
def test_bad_arguments_raise_spec_error(kwargs: dict, name: str) -> None:
    args = {"kind": "sjlt", "in_dim": 10, "out_dim": 16, "seed": 0} | kwargs
    with pytest.raises(SpecError, match=name) as info:
        make_projector(args.pop("kind"), args.pop("in_dim"), args.pop("out_dim"), **args)
    assert "\n" not in str(info.value)


def test_gaussian_ignores_nnz() -> None:
    assert make_projector("gaussian", 10, 2, 0, nnz=4).out_dim == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_is_an_error() -> None:
    with pytest.raises(SpecError, match="device"):
        make_projector("sjlt", 10, 16, 0, device="cuda")


@pytest.mark.parametrize("kind", PROJECTIONS)
@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(10),
        torch.zeros(2, 11),
        torch.zeros(2, 10, 1),
        torch.zeros(2, 10, dtype=torch.int64),
    ],
    ids=["1d", "wrong-width", "3d", "int"],
)
def test_bad_input_raises_data_error(kind: str, x: torch.Tensor) -> None:
    proj = make_projector(kind, 10, 16, 0)
    with pytest.raises(DataError, match="x must"):
        proj.project(x)


def test_add_columns_refuses_a_range_off_the_maps_chunks() -> None:
    """The streamed path projects layer blocks between the breaks the map was built with; a
    range that starts or ends inside a chunk would take a wrong slice of the map."""
    proj = make_projector("sjlt", 10, 4, 0, nnz=2, breaks=(4,))
    x = torch.ones(2, 10)
    whole = proj.add_columns(x[:, :4], 0) + proj.add_columns(x[:, 4:], 4)
    torch.testing.assert_close(whole.T, proj.project(x))
    for start, stop in ((0, 3), (1, 4), (4, 9)):
        with pytest.raises(ValueError, match=rf"^columns \[{start}, {stop}\) do not fall on"):
            proj.add_columns(x[:, start:stop], start)


def test_stored_maps_keep_their_numbers() -> None:
    """An index stores rows projected by these seeded maps and a later query projects with the
    map rebuilt from the seed: a change to the seeding (derived_seed's text or byte order, the
    Gaussian block size) would score new queries against old rows silently. Numbers pinned
    from the map as shipped (sjlt: signs of P e_i · √nnz; gaussian: rows 0, 5000, 8200 of G,
    in its first and second block of 8192 rows)."""
    sjlt = make_projector("sjlt", 5, 4, 123, nnz=2).project(torch.eye(5)) * math.sqrt(2)
    want = [[0, -1, 0, -1], [0, 1, 0, 1], [0, -1, 0, 1], [1, 0, 1, 0], [1, 0, -1, 0]]
    torch.testing.assert_close(sjlt, torch.tensor(want, dtype=torch.float32))
    x = torch.zeros(3, 8300)
    x[0, 0], x[1, 5000], x[2, 8200] = 1.0, 1.0, 1.0
    gauss = make_projector("gaussian", 8300, 2, 7).project(x)
    want_g = [[-0.386894, -0.353211], [-0.184343, -0.512251], [1.30782, 1.27453]]
    torch.testing.assert_close(gauss, torch.tensor(want_g), rtol=1e-5, atol=1e-6)
