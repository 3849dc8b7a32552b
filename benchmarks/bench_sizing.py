"""Sizing: bytes per training sample on disk, measured from real files, as a function of D and N.

Two parts, both measuring the files gradindex itself writes:

1. A real ``build_index`` of a tiny UNet (2 checkpoints, K = 10 timesteps, M = 1, d = 64, so
   D = 128) at two dataset sizes: every file of the index folder, to confirm the model below.
2. The same writers at scale without featurizing (row values do not change sizes: the HDF5
   datasets are contiguous and uncompressed): ``VectorStore`` with C = 2, K·M = 10, and each
   search index kind saved as ``build`` saves it (flat via ``VectorIndex``, HNSW / IVF via
   ``search_tuning.make_index`` + ``faiss.write_index``; the knob tuning does not change sizes),
   for D in {256, 1024, 4096} and N in {1000, 4000}.

Bytes per sample = (size at N2 - size at N1) / (N2 - N1); the rest is a fixed overhead (IVF:
its nlist centroids are taken out as the fixed part, as nlist grows with N).
Writes ``benchmarks/results/sizing.json`` and ``benchmarks/results/sizing.md``.

    OMP_NUM_THREADS=1 python benchmarks/bench_sizing.py
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
C, KM = 2, 10


def real_build(tmp: Path) -> dict:
    """Sizes of every file of two real index folders (N = 32 and 96)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    import gradindex as gi
    from tests.conftest import tiny_unet

    ckpts = []
    for seed in (1, 2):
        DDPMPipeline(
            unet=tiny_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=1000)
        ).save_pretrained(tmp / f"c{seed}")
        ckpts.append(tmp / f"c{seed}")
    spec = gi.BuildSpec(proj_dim=64, timesteps=10, noise_draws=1, batch_size=16)
    images = np.random.default_rng(0).random((96, 1, 8, 8), dtype=np.float32)
    out = {}
    for n in (32, 96):
        t0 = time.perf_counter()
        idx = gi.build_index(
            checkpoints=ckpts, data=images[:n], out=tmp / f"real{n}", spec=spec, progress=False
        )
        out[n] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "files": {p.name: p.stat().st_size for p in sorted(idx.path.iterdir())},
        }
    return {"dim": 128, "checkpoints": C, "draws": KM, "sizes": out}


def synthetic(tmp: Path, dims: tuple[int, ...], ns: tuple[int, int]) -> list[dict]:
    from gradindex.search import tuning as st
    from gradindex.search.faiss_index import VectorIndex
    from gradindex.store.vectors import VectorStore

    rows = []
    rng = np.random.default_rng(0)
    for d in dims:
        for dtype in ("float32", "float16") if d == dims[0] else ("float32",):
            for n in ns:
                x = rng.standard_normal((n, d), dtype=np.float32)
                folder = tmp / f"s{d}_{n}_{dtype}"
                folder.mkdir()
                store = VectorStore.create(
                    folder / "vectors.h5", np.arange(n), d, C, KM, dtype, {"spec": "{}"}
                )
                with store:
                    for a in range(0, n, 4096):
                        b = min(n, a + 4096)
                        store.write_rows(
                            a,
                            x[a:b],
                            x[a:b],
                            np.ones((b - a, C, KM), np.float32),
                            np.zeros(b - a, bool),
                        )
                rec = {"dim": d, "n": n, "store_dtype": dtype}
                rec["vectors.h5"] = (folder / "vectors.h5").stat().st_size
                if dtype == "float32":
                    VectorIndex.build(x, "tracin", kind="flat").save(folder / "flat.faiss")
                    rec["flat.faiss"] = (folder / "flat.faiss").stat().st_size
                    for kind in ("hnsw", "ivf"):
                        index, _ = st.make_index(st.factory_for(kind, n), x, 0)
                        faiss.write_index(index, str(folder / f"{kind}.faiss"))
                        rec[f"{kind}.faiss"] = (folder / f"{kind}.faiss").stat().st_size
                        rec[f"{kind}_factory"] = st.factory_for(kind, n)
                rows.append(rec)
                print(rec, flush=True)
    return rows


def per_sample(rows: list[dict], ns: tuple[int, int]) -> list[dict]:
    """Slope (bytes per sample) and intercept (fixed bytes) for each (D, dtype, file)."""
    out = []
    keys = sorted({(r["dim"], r["store_dtype"]) for r in rows})
    for d, dtype in keys:
        a = next(r for r in rows if (r["dim"], r["store_dtype"], r["n"]) == (d, dtype, ns[0]))
        b = next(r for r in rows if (r["dim"], r["store_dtype"], r["n"]) == (d, dtype, ns[1]))
        rec = {"dim": d, "store_dtype": dtype}
        for f in ("vectors.h5", "flat.faiss", "hnsw.faiss"):
            if f in a:
                slope = (b[f] - a[f]) / (ns[1] - ns[0])
                rec[f] = {"per_sample": round(slope, 2), "fixed": round(a[f] - slope * ns[0])}
        if "ivf.faiss" in b:  # nlist grows with N: take out the centroids (nlist x D float32)
            nlist = int(b["ivf_factory"].split(",")[0][3:])
            rest = b["ivf.faiss"] - 4 * d * nlist
            rec["ivf.faiss"] = {"per_sample": round(rest / ns[1], 2), "fixed": 4 * d * nlist}
        out.append(rec)
    return out


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ns = (1000, 4000)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        real = real_build(tmp)
        rows = synthetic(tmp, (256, 1024, 4096), ns)
    fits = per_sample(rows, ns)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "faiss": faiss.__version__,
        "checkpoints": C,
        "draws_KM": KM,
        "real_build": real,
        "synthetic": rows,
        "per_sample": fits,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sizing.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Sizing: bytes per training sample (measured)",
        "",
        f"C = {C} checkpoints, K·M = {KM} draws; N = {ns[0]} and {ns[1]}; faiss {faiss.__version__}.",
        "",
        "| D | store | vectors.h5 /sample | flat .faiss /sample /method | HNSW32 /sample | IVF /sample (centroids at N2) |",
        "|---|---|---|---|---|---|",
    ]
    for r in fits:
        cell = {
            k: r.get(k, {}).get("per_sample", "-")
            for k in ("vectors.h5", "flat.faiss", "hnsw.faiss")
        }
        ivf = r.get("ivf.faiss")
        ivf_cell = f"{ivf['per_sample']} ({ivf['fixed']} B)" if ivf else "-"
        lines.append(
            f"| {r['dim']} | {r['store_dtype']} | {cell['vectors.h5']} | {cell['flat.faiss']} | "
            f"{cell['hnsw.faiss']} | {ivf_cell} |"
        )
    lines += ["", "Real index folders (tiny UNet, D = 128):", ""]
    for n, rec in real["sizes"].items():
        lines.append(
            f"- N = {n} ({rec['seconds']} s): "
            + ", ".join(f"{k} {v}" for k, v in rec["files"].items())
        )
    (RESULTS / "sizing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
