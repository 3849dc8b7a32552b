"""What truncating the kernel's eigenbasis costs on the LDS benchmark (issue 27).

The library keeps a kernel exact where its factors fit ``kernel_factors.KERNEL_BYTES`` and
otherwise keeps the top r eigenpairs with the left-out ones replaced by their mean (the demo
index keeps 1,458 of 1,797 in the dual form, ~81%; an N = 2,000 x 3 synthetic one ~65%). On the
LDS benchmark (N = 500, 4 checkpoints, d = 4,096) the kernel is exact, so this program forces
the truncation there and measures it against the exact kernel:

- copies of the benchmark's cached ``mse`` and ``square`` indexes (K = 10; the cache is only
  read: ``kernel.h5`` is left behind, every copy lives in a scratch folder);
- per (form, share): the kernel recomputed by the library's own ``add_kernel`` (factors from
  the rows, manifest record, checksums) with the rank bounds forced to ``round(share · N)``
  (``forced_rank`` patches ``dual_bounds`` / ``rank_bounds`` / ``share_columns`` and, for the primal form U [d, r]
  at N < d, the form, inside ``gradindex.store.kernel`` for the duration of the call; no
  library default is changed). λ does not move: it comes from the trace and top eigenvalue;
- ``trak`` (D-TRAK on the square index) and ``retrak`` served by ``AttributionIndex.search``
  (exact, k = N) for the 200 targets' cached query rows; LDS by ``bench_lds``'s own functions
  and measured outputs; the paired difference against the exact kernel with its 95% bootstrap
  interval over targets; the top-10 overlap with the exact kernel's lists.

The issue's bar for an approximation: top-10 overlap >= 0.99 and |ΔLDS| <= 0.002.
Writes ``benchmarks/results/kernel_lds.json`` and ``.md``.

    GRADINDEX_LDS_CACHE=/path/to/lds-cache python benchmarks/bench_kernel_lds.py
    python benchmarks/bench_kernel_lds.py --dual-shares 0.81 0.65 --primal-shares 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_lds as lds_bench  # noqa: E402
import kernel_lds_report as report  # noqa: E402

import gradindex as gi  # noqa: E402
import gradindex.store.kernel as kernel_mod  # noqa: E402
from gradindex.eval.lds import bootstrap_ci, lds_per_target  # noqa: E402
from gradindex.query import stored_method  # noqa: E402
from gradindex.search.kernel_recall import add_kernel  # noqa: E402
from gradindex.store.kernel import KERNEL_METHODS, SUFFIX, lambda_key  # noqa: E402
from gradindex.store.kernel_factors import trimmed  # noqa: E402
from gradindex.store.layout import KERNEL, MANIFEST  # noqa: E402
from gradindex.store.lifecycle import folder_lock  # noqa: E402

RESULTS = HERE / "results"
K = 10
LOSSES = ("mse", "square")
FORMS = ("dual", "primal")
BAR_OVERLAP, BAR_LDS = 0.99, 0.002
"""The issue's bar for an approximate kernel: top-10 overlap and |ΔLDS| against the exact one."""


@contextlib.contextmanager
def forced_rank(rank: int, form: str) -> Iterator[None]:
    """Inside: ``kernel.write_kernel`` keeps exactly ``rank`` eigenpairs per checkpoint (fewer
    only where a checkpoint's rank is lower), in ``form`` ("dual": V [N, r]; "primal": U [d, r],
    even where N < d). Patches the bounds (and the form) that ``gradindex.store.kernel`` looked
    up, and restores them on the way out."""
    if form not in FORMS or rank < 1:
        raise ValueError(f"form {form!r}, rank {rank}: need a form in {FORMS} and rank >= 1")
    saved = {
        name: getattr(kernel_mod, name)
        for name in ("dual_bounds", "rank_bounds", "row_set_factors", "share_columns")
    }
    factors = saved["row_set_factors"]

    def primal(rows, keep, weights, d, bounds, dual=False):
        return factors(rows, keep, weights, d, bounds, False)

    kernel_mod.dual_bounds = lambda *_: (rank, rank)
    kernel_mod.rank_bounds = lambda *_: (rank, rank)
    kernel_mod.share_columns = lambda factors, *_: {  # the dual's shared budget: every set r
        r: trimmed(f, min(rank, f.eigenvalues.shape[1])) for r, f in factors.items()
    }
    if form == "primal":
        kernel_mod.row_set_factors = primal
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernel_mod, name, value)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> np.ndarray:
    """Per row, the share of the k best columns of ``a`` that are among the k best of ``b``
    ([T, N] each → [T]); equal scores broken by column, as the search does."""
    ta = np.lexsort((np.broadcast_to(np.arange(a.shape[1]), a.shape), -a), axis=1)[:, :k]
    tb = np.lexsort((np.broadcast_to(np.arange(b.shape[1]), b.shape), -b), axis=1)[:, :k]
    return np.array([len(np.intersect1d(x, y)) / k for x, y in zip(ta, tb, strict=True)])


def copy_index(src: Path, dst: Path) -> None:
    """The index folder without its kernel.h5 (recomputed in the copy); the source only read."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(KERNEL, ".*"))


def write_kernel_at(folder: Path, rank: int | None, form: str) -> dict:
    """Recompute ``folder``'s kernel with the library's ``add_kernel``: exact (every
    eigenpair, ``exact=True``) when ``rank`` is None, else ``rank`` eigenpairs in ``form``.
    Returns what was kept."""
    started = time.perf_counter()
    with folder_lock(folder), forced_rank(rank, form) if rank else contextlib.nullcontext():
        record = add_kernel(folder, exact=rank is None)
    kept = {}
    with h5py.File(folder / KERNEL, "r") as f:
        for rows, sfx in SUFFIX.items():
            eig = f[f"eigenvalues{sfx}"][()]
            kept[rows] = {
                "rank_per_checkpoint": [int(n) for n in (eig > 0).sum(axis=1)],
                "tail": [float(t) for t in f[f"tail{sfx}"][()]],
                "form": "dual" if f"dual_basis{sfx}" in f else "primal",
            }
    return {
        "exact": record["exact"],
        "kept": kept,
        "kernel_bytes": (folder / KERNEL).stat().st_size,
        "seconds": time.perf_counter() - started,
    }


def exact_spectra(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{row set: (eigenvalues [C, r] of the exact kernel, descending; λ [C])}."""
    record = json.loads((folder / MANIFEST).read_text())["kernel"]
    with h5py.File(folder / KERNEL, "r") as f:
        return {
            rows: (f[f"eigenvalues{sfx}"][()], np.asarray(record[lambda_key(rows)]))
            for rows, sfx in SUFFIX.items()
        }


def left_out(spectra: dict, rank: int) -> dict[str, dict[str, float]]:
    """Per row set, what keeping ``rank`` eigenpairs leaves out, worst checkpoint: the largest
    left-out eigenvalue over λ, and the share of the trace kept."""
    out = {}
    for rows, (eig, lam) in spectra.items():
        nxt = eig[:, rank] if rank < eig.shape[1] else np.zeros(len(eig))
        out[rows] = {
            "largest_left_out_over_lambda": float((nxt / lam).max()),
            "trace_share_kept": float((eig[:, :rank].sum(1) / eig.sum(1)).min()),
        }
    return out


def kernel_scores(folder: Path, queries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{kernel method: [T, N] scores in training-row order}, from a freshly opened index."""
    idx = gi.AttributionIndex.open(folder)
    out = {}
    for method in KERNEL_METHODS:
        out[method] = lds_bench.index_scores(idx, queries[stored_method(method)], method)
    return out


def kernel_margin(folder: Path) -> dict:
    """An index's own kernel.h5 (format 3), per row set: the rank kept per checkpoint, the
    form, and a bound on its largest left-out eigenvalue / λ: the smallest kept one over λ
    (0 where nothing non-zero was left out), worst checkpoint. To place a kernel the library
    truncated against what this benchmark measured."""
    if not (folder / MANIFEST).is_file() or not (folder / KERNEL).is_file():
        raise SystemExit(f"--margin {folder}: not an index folder with a kernel.h5")
    manifest = json.loads((folder / MANIFEST).read_text())
    record = manifest.get("kernel") or {}
    kept_rows = int(manifest["num_rows"]) - int(manifest.get("num_flagged") or 0)
    out: dict = {"folder": str(folder), "build_id": manifest.get("build_id"), "rows": kept_rows}
    with h5py.File(folder / KERNEL, "r") as f:
        if "eigenvalues" not in f or lambda_key("tracin") not in record:
            raise SystemExit(f"{folder}: no eigen factors in kernel.h5 (format 3 is read); "
                             f"convert it (or a copy) with: gradindex kernel {folder}")  # fmt: skip
        for rows, sfx in SUFFIX.items():
            eig, tail = f[f"eigenvalues{sfx}"][()], f[f"tail{sfx}"][()]
            lam = np.asarray(record[lambda_key(rows)], dtype=np.float64)
            kept = (eig > 0).sum(axis=1)
            smallest = np.array([e[:k].min() if k else 0.0 for e, k in zip(eig, kept, strict=True)])
            out[rows] = {
                "rank_per_checkpoint": [int(k) for k in kept],
                "form": "dual" if f"dual_basis{sfx}" in f else "primal",
                "left_out_over_lambda_at_most": float(np.where(tail > 0, smallest / lam, 0).max()),
            }
    return out


def check_cache(cache: Path) -> None:
    """Refuse unless every input exists, so that ``bench_lds``'s readers never write in the
    cache (they compute and store what is missing)."""
    need = [cache / "targets.npz"]
    need += [cache / "measured" / f"{name}.npy" for _, _, name in lds_bench.subset_names()]
    for loss in LOSSES:
        need += [cache / "index" / f"{loss}-K{K}" / MANIFEST, cache / "embed" / f"{loss}-K{K}.npz"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise SystemExit(f"{len(missing)} LDS cache inputs missing, e.g. {missing[0]}; run "
                         "benchmarks/bench_lds.py all first (or point GRADINDEX_LDS_CACHE at it)")  # fmt: skip


def labels() -> dict[tuple[str, str], str]:
    """(index loss, kernel method) → bench_lds's row label (e.g. 'D-TRAK (square)')."""
    return {
        (loss, method): label
        for label, loss, method, pre in lds_bench.METHODS
        if pre == "none" and method in KERNEL_METHODS
    }


def settings(n: int, dual: list[float], primal: list[float]) -> list[tuple[str, float, int]]:
    """(form, share, rank) of every truncated kernel measured."""
    out = [("dual", s, max(1, round(s * n))) for s in dual]
    return out + [("primal", s, max(1, round(s * n))) for s in primal]


def groups_row(per: np.ndarray, groups: np.ndarray, boot: int) -> dict:
    """LDS per target → its mean and interval over all targets, held-out, generated."""
    sel = {"all": slice(None), "heldout": groups == 0, "generated": groups == 1}
    return {g: bootstrap_ci(per[s], boot).to_dict() for g, s in sel.items()}


def relative_error(scores: np.ndarray, reference: np.ndarray) -> float:
    """max |scores − reference| / max |reference|."""
    return float(np.abs(scores - reference).max() / np.abs(reference).max())


def compare(per: np.ndarray, per_exact: np.ndarray, groups, overlap, boot: int) -> dict:
    """One truncated kernel's row: LDS per group, its paired difference with the exact
    kernel's (all / held-out / generated) and the top-10 overlap."""
    row = groups_row(per, groups, boot)
    row |= {f"diff_{g}": v for g, v in groups_row(per - per_exact, groups, boot).items()}
    row["top10_overlap_mean"] = float(overlap.mean())
    row["top10_overlap_min"] = float(overlap.min())
    row["meets_bar"] = bool(
        row["top10_overlap_mean"] >= BAR_OVERLAP and abs(row["diff_all"]["mean"]) <= BAR_LDS
    )
    return row


def run(cache: Path, work: Path, dual: list[float], primal: list[float]) -> dict:
    """Every (index, form, share): kernel recomputed in the copy, scores, LDS against exact."""
    lds_bench.CACHE = cache
    check_cache(cache)
    if work.resolve() == cache or cache in work.resolve().parents:
        raise SystemExit(f"--work {work} lies in the LDS cache {cache}: give a scratch folder")
    per_draw, done, _ = lds_bench.measured_matrix(False)
    losses, m = per_draw.mean(axis=2), lds_bench.masks()[done]
    groups = lds_bench.all_targets()[1]
    boot = lds_bench.CONFIG["num_boot"]
    out: dict = {"indexes": {}, "methods": {}}
    for loss in LOSSES:
        folder = work / f"{loss}-K{K}"
        copy_index(cache / "index" / f"{loss}-K{K}", folder)
        with np.load(cache / "embed" / f"{loss}-K{K}.npz") as f:
            queries = {rows: f[f"target_{rows}"] for rows in SUFFIX}
        n = int(json.loads((folder / MANIFEST).read_text())["num_rows"])
        kernels = {"exact": write_kernel_at(folder, None, "dual")}  # dual: N < d
        exact, spectra = kernel_scores(folder, queries), exact_spectra(folder)
        idx = gi.AttributionIndex.open(folder)
        per_exact, rows = {}, {}
        for method, sc in exact.items():
            per_exact[method] = lds_per_target(sc, m, losses)
            formula = lds_bench.formula_scores(idx, queries[stored_method(method)], method)
            rows[labels()[(loss, method)]] = {
                "exact": groups_row(per_exact[method], groups, boot)
                | {
                    "max_abs_diff_over_max_abs_vs_formula": relative_error(sc, formula),
                    "top10_overlap_vs_formula": float(top_overlap(sc, formula).mean()),
                }
            }
        for form, share, rank in settings(n, dual, primal):
            key = f"{form} {share:g}"
            kernels[key] = write_kernel_at(folder, rank, form) | {
                "rank": rank,
                "share": share,
                "left_out": left_out(spectra, rank),
            }
            for method, sc in kernel_scores(folder, queries).items():
                per = lds_per_target(sc, m, losses)
                overlap = top_overlap(sc, exact[method])
                rows[labels()[(loss, method)]][key] = compare(
                    per, per_exact[method], groups, overlap, boot
                ) | {"rank": rank, "share": share, "form": form}
        out["indexes"][loss] = {"num_rows": n, "kernels": kernels}
        out["methods"].update(rows)
    out["num_targets"] = {
        "heldout": int((groups == 0).sum()),
        "generated": int((groups == 1).sum()),
    }
    out["num_subsets"] = int(m.shape[0])
    out["labels"] = {
        label: {"index": loss, "rows": KERNEL_METHODS[method]}
        for (loss, method), label in labels().items()
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", type=Path, default=lds_bench.CACHE, help="bench_lds's cache (read)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for the index copies "
                   "(default: a temporary one, removed at the end)")  # fmt: skip
    p.add_argument(
        "--dual-shares", type=float, nargs="+", default=[0.9, 0.81, 0.65, 0.5, 0.25, 0.1]
    )
    p.add_argument("--primal-shares", type=float, nargs="+", default=[1.0, 0.81, 0.5, 0.25])
    p.add_argument("--margin", type=Path, nargs="*", default=[], help="index folders whose own "
                   "(truncated) kernel to place against the measured bar, e.g. the demo's")  # fmt: skip
    args = p.parse_args()
    for s in args.dual_shares + args.primal_shares:
        if not 0 < s <= 1:
            p.error(f"share {s}: must lie in (0, 1]")
    margins = [kernel_margin(folder.resolve()) for folder in args.margin]
    work = args.work or Path(tempfile.mkdtemp(prefix="kernel_lds_"))
    try:
        r = run(args.cache.resolve(), work, args.dual_shares, args.primal_shares)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    r["num_rows"] = next(iter(r["indexes"].values()))["num_rows"]
    r["num_boot"] = lds_bench.CONFIG["num_boot"]
    r["lds_json"] = report.lds_json_figures(RESULTS / "lds.json", list(r["methods"]), K)
    r["K"], r["bar"] = K, {"top10_overlap": BAR_OVERLAP, "abs_delta_lds": BAR_LDS}
    r["verdict"], r["margins"] = report.verdict(r), margins
    r["command"] = " ".join(["python", "benchmarks/bench_kernel_lds.py", *sys.argv[1:]])
    r["machine"] = (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} CPUs (shared)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernel_lds.json").write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
    text = report.markdown(r)
    (RESULTS / "kernel_lds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
