"""Does gradindex attribute correctly? Projection fidelity, the timestep bias, generally
influential samples, planted outliers, the replay protocol and self-retrieval, measured.

Setup (the demo's): scikit-learn digits at 16x16, ``train_ddpm`` UNet (619,697 parameters).

- ``full`` model: ``train_ddpm`` defaults on all 1,797 digits (1,200 steps, checkpoints every
  300); attribution uses checkpoints 600 and 1200 with their TracIn weights and the
  ``BuildSpec`` defaults (sjlt, d = 4096, K = 10, M = 1). For time its index holds the first
  900 training digits; 128 generated images are the queries.
- ``outliers`` model: 1,000 digits + 48 planted out-of-domain images (12 each: near-constant,
  shapes, period-2 stripes / checkerboards, i.i.d. noise), 600 steps, checkpoints 300 and 600.
  Its index holds the first 500 digits and every outlier; 100 held-out digits are the queries.
- Projection fidelity: 400 training digits x 64 generated queries, exact (full-space) scores vs
  sjlt d in {256, 1024, 4096, 16384} and dense gaussian d in {256, 1024} (larger d is too slow
  on these cores).

Stages (each caches under ``benchmarks/cache/attribution/``; ``all`` runs them in order):

    python benchmarks/bench_attribution.py train-full       # trains the demo model (~4 min)
    python benchmarks/bench_attribution.py train-outliers   # trains the outlier model
    python benchmarks/bench_attribution.py queries          # generated query images
    python benchmarks/bench_attribution.py fidelity         # exact vs projected scores
    python benchmarks/bench_attribution.py main             # index on the full model + report
    python benchmarks/bench_attribution.py outliers         # index on the outlier model
    python benchmarks/bench_attribution.py replay-rows      # replay training rows (no index)
    python benchmarks/bench_attribution.py replay           # replay vs grid protocol
    python benchmarks/bench_attribution.py summarize        # results/attribution.{json,md}, PNGs

Run under ``nice -n 10``; torch uses one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "attribution"
RESULTS = HERE / "results"
SEED = 0
N_TRAIN_OUT = 1000  # digits in the outlier model's training set
N_HELDOUT = 200
OUTLIER_KINDS = ("constant", "shapes", "stripes", "noise")
PER_KIND = 12  # 4 x 12 = 48 outliers = 4.6% of the training set
OUTLIER_STEPS = 600
N_OUT_INDEX = 500  # training digits in the outlier model's index (all 48 outliers too)
N_OUT_QUERIES = 100  # held-out digits queried
FULL_CHECKPOINTS = ("checkpoint-600", "checkpoint-1200")
N_GENERATED = 128
N_MAIN = 900  # the full model's index holds its first 900 training digits (time budget)
FIDELITY_N = 400
FIDELITY_Q = 64
FIDELITY_DIMS = (256, 1024, 4096, 16384)
GAUSSIAN_DIMS = (256, 1024)  # dense gaussian of p = 620k is affordable only at small d here

logger = logging.getLogger("bench_attribution")


def _threads() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GRADINDEX_NUM_THREADS", "1")


# -- data -------------------------------------------------------------------------------------


def digit_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train digits [1000, 1, 16, 16], held-out digits [200, ...], their dataset indices)."""
    from gradindex.demo.training import load_digits_images

    x = load_digits_images(16)
    perm = np.random.default_rng(SEED).permutation(len(x))
    tr, ho = perm[:N_TRAIN_OUT], perm[N_TRAIN_OUT : N_TRAIN_OUT + N_HELDOUT]
    return x[tr], x[ho], tr, ho


def make_outliers(kind: str, n: int, seed: int, size: int = 16) -> np.ndarray:
    """n out-of-domain images of one kind, float [n, 1, size, size] in [0, 1]."""
    rng = np.random.default_rng([seed, OUTLIER_KINDS.index(kind)])
    out = np.zeros((n, 1, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        if kind == "constant":  # flat grey with a faint texture
            img = rng.uniform(0.2, 0.9) + rng.normal(0, 0.02, (size, size))
        elif kind == "shapes":  # a filled rectangle, disc or triangle: another simple domain
            img = np.zeros((size, size))
            shape = i % 3
            cy, cx = rng.integers(5, size - 5, 2)
            r = rng.integers(3, 6)
            if shape == 0:
                img[cy - r : cy + r, cx - r + 1 : cx + r - 1] = 1.0
            elif shape == 1:
                img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
            else:
                img[(yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - cy + r) / 2)] = 1.0
        elif kind == "stripes":  # period-2 stripes or checkerboards: highest frequency
            phase = rng.integers(0, 2)
            pattern = i % 3
            if pattern == 0:
                img = ((xx + phase) % 2).astype(float)
            elif pattern == 1:
                img = ((yy + phase) % 2).astype(float)
            else:
                img = ((xx + yy + phase) % 2).astype(float)
        elif kind == "noise":  # i.i.d. uniform pixels
            img = rng.uniform(0, 1, (size, size))
        else:
            raise ValueError(kind)
        out[i, 0] = np.clip(img, 0, 1)
    return out


def outlier_training_set(num_digits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, 16, 16], labels [N]: '' for digits, else the outlier kind); the first
    ``num_digits`` digits only when given (the outliers are always all included)."""
    digits, _, _, _ = digit_split()
    digits = digits[:num_digits]
    parts = [digits] + [make_outliers(k, PER_KIND, SEED) for k in OUTLIER_KINDS]
    labels = [""] * len(digits) + [k for k in OUTLIER_KINDS for _ in range(PER_KIND)]
    return np.concatenate(parts), np.asarray(labels)


def stage_train_full() -> None:
    """The demo model: ``train_ddpm`` defaults on all digits (reused when already trained)."""
    from gradindex.demo.training import load_digits_images, train_ddpm

    train_ddpm(load_digits_images(16), CACHE / "full", seed=SEED, progress=False)


def stage_train_outliers() -> None:
    from gradindex.demo.training import train_ddpm

    images, _ = outlier_training_set()
    t0 = time.perf_counter()
    train_ddpm(
        images, CACHE / "outliers", steps=OUTLIER_STEPS, checkpoint_every=300, seed=SEED,
        progress=False,
    )  # fmt: skip
    _save_json(CACHE / "outliers_train_seconds.json", {"seconds": time.perf_counter() - t0})


# -- helpers ----------------------------------------------------------------------------------


def _save_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


# -- queries ----------------------------------------------------------------------------------


def generated_queries(model: str) -> np.ndarray:
    """N_GENERATED images sampled from a model's final pipeline (cached), [Q, 1, 16, 16]."""
    from gradindex.demo.sampling import sample_images

    path = CACHE / f"generated_{model}.npy"
    if not path.exists():
        imgs = sample_images(CACHE / model, N_GENERATED, seed=SEED + 1, num_inference_steps=250)
        np.save(path, imgs)
    return np.load(path)


def stage_queries() -> None:
    generated_queries("full")


def _full_checkpoints() -> tuple[list[Path], list[float]]:
    cfg = json.loads((CACHE / "full" / "train_config.json").read_text())
    names = [f"checkpoint-{s}" for s in cfg["checkpoint_steps"]]
    weights = [cfg["tracin_weights"][names.index(n)] for n in FULL_CHECKPOINTS]
    return [CACHE / "full" / n for n in FULL_CHECKPOINTS], weights


# -- projection fidelity ----------------------------------------------------------------------


def _featurize_full_space(ckpt_dirs: list[Path], images: np.ndarray, spec: Any) -> dict:
    """Full-space a_c, r_c ([C, N, p] float32 each) and norms [N, C, K] of images in [0, 1]."""
    from gradindex.featurize.gradients import GradientFeaturizer
    from gradindex.inputs.models import load_checkpoints

    ckpts = load_checkpoints([str(c) for c in ckpt_dirs])
    spec = spec.replace(num_train_timesteps=ckpts[0].num_train_timesteps)
    draws = spec.draws(ckpts[0].sample_shape())
    x0 = torch.from_numpy(images) * 2.0 - 1.0
    feats = [GradientFeaturizer(c, spec) for c in ckpts]
    p, n, C = feats[0].num_params, len(images), len(ckpts)
    A = np.empty((C, n, p), np.float32)
    R = np.empty((C, n, p), np.float32)
    norms = np.empty((n, C, spec.num_draws), np.float32)
    for c, f in enumerate(feats):
        for i in range(0, n, 16):
            out = f.featurize(x0[i : i + 16], draws)
            A[c, i : i + 16] = out.tracin.numpy()
            R[c, i : i + 16] = out.retrac.numpy()
            norms[i : i + 16, c] = out.norms.numpy()
    return {"A": A, "R": R, "norms": norms, "p": p, "timesteps": spec.timestep_values()}


def _scores(A: np.ndarray, R: np.ndarray, w: list[float], q: slice, t: slice) -> dict:
    """TracIn Σ_c w_c ⟨a_c, a_c'⟩ and ReTrac Σ_c w_c cos(r_c, r_c') of rows ``q`` (queries)
    against rows ``t``. A, R: [C, N, p] full-space (or equally projected) features."""
    tr = sum(wc * A[c, q] @ A[c, t].T for c, wc in enumerate(w))
    rn = [R[c] / np.linalg.norm(R[c], axis=1, keepdims=True) for c in range(len(w))]
    re = sum(wc * rn[c][q] @ rn[c][t].T for c, wc in enumerate(w))
    return {"tracin": tr, "retrac": re}  # each [Q, N]


def _agreement(exact: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    """Mean over queries of the Spearman correlation and top-10 / top-100 overlap (and their
    minima), as every build measures it (``gradindex.featurize.fidelity.agreement``)."""
    from gradindex.featurize.fidelity import agreement

    return agreement(exact, approx, (10, 100))


def stage_fidelity() -> None:
    from gradindex.featurize.embedding import projection_seed
    from gradindex.featurize.projection import make_projector
    from gradindex.spec import BuildSpec

    ckpt_dirs, weights = _full_checkpoints()
    images = _fidelity_images()
    spec = BuildSpec()
    t0 = time.perf_counter()
    f = _featurize_full_space(ckpt_dirs, images, spec)
    feat_s = time.perf_counter() - t0
    logger.info("fidelity: featurized %d images in %.0f s", len(images), feat_s)
    q, t = slice(0, FIDELITY_Q), slice(FIDELITY_Q, None)
    exact = _scores(f["A"], f["R"], weights, q, t)
    np.savez(CACHE / "fidelity_exact.npz", **exact, norms=f["norms"], seconds=feat_s)
    results = []
    for kind in ("sjlt", "gaussian"):
        for d in FIDELITY_DIMS if kind == "sjlt" else GAUSSIAN_DIMS:
            t1 = time.perf_counter()
            PA, PR = [], []
            for c in range(len(weights)):
                proj = make_projector(kind, f["p"], d, projection_seed(spec.proj_seed, c), nnz=4)
                PA.append(proj.project(torch.from_numpy(f["A"][c])).numpy())
                PR.append(proj.project(torch.from_numpy(f["R"][c])).numpy())
            proj_s = time.perf_counter() - t1
            approx = _scores(np.stack(PA), np.stack(PR), weights, q, t)
            for m in ("tracin", "retrac"):
                row = {"projection": kind, "d": d, "method": m, "project_seconds": proj_s}
                row.update(_agreement(exact[m], approx[m]))
                results.append(row)
                logger.info("fidelity %s", row)
            _save_json(CACHE / "fidelity.json", _fidelity_record(results, f, weights, feat_s))
    _save_json(CACHE / "fidelity.json", _fidelity_record(results, f, weights, feat_s))


def _fidelity_images() -> np.ndarray:
    """The fidelity stage's images: FIDELITY_Q generated queries, then FIDELITY_N digits."""
    from gradindex.demo.training import load_digits_images

    digits = load_digits_images(16)
    rows = np.sort(np.random.default_rng(SEED).choice(len(digits), FIDELITY_N, replace=False))
    return np.concatenate([generated_queries("full")[:FIDELITY_Q], digits[rows]])


def stage_fidelity_kronecker() -> None:
    """Kronecker-factored projection (projected inside the hooks) against the exact scores the
    fidelity stage cached, at d in {1024, 4096}; its norms must equal the exact ones."""
    from gradindex.featurize.embedding import projection_seed
    from gradindex.featurize.kronecker import KroneckerFeaturizer
    from gradindex.inputs.models import load_checkpoints
    from gradindex.spec import BuildSpec

    if not (CACHE / "fidelity_exact.npz").exists():  # exact scores only, not the other projectors
        ckpt_dirs, weights = _full_checkpoints()
        t0 = time.perf_counter()
        f = _featurize_full_space(ckpt_dirs, _fidelity_images(), BuildSpec())
        exact = _scores(f["A"], f["R"], weights, slice(0, FIDELITY_Q), slice(FIDELITY_Q, None))
        np.savez(CACHE / "fidelity_exact.npz", **exact, norms=f["norms"],
                 seconds=time.perf_counter() - t0)  # fmt: skip
        del f
    with np.load(CACHE / "fidelity_exact.npz") as z:
        exact = {m: z[m] for m in ("tracin", "retrac")}
        exact_norms = z["norms"]
    ckpt_dirs, weights = _full_checkpoints()
    ckpts = load_checkpoints([str(c) for c in ckpt_dirs])
    x0 = torch.from_numpy(_fidelity_images()) * 2.0 - 1.0
    q, t = slice(0, FIDELITY_Q), slice(FIDELITY_Q, None)
    fid = _load("fidelity")
    results = [r for r in fid["rows"] if r["projection"] != "kronecker"]
    for d in (1024, 4096):
        spec = BuildSpec(projection="kronecker", proj_dim=d)
        spec = spec.replace(num_train_timesteps=ckpts[0].num_train_timesteps)
        draws = spec.draws(ckpts[0].sample_shape())
        t1 = time.perf_counter()
        PA, PR, norms = [], [], []
        for c, ck in enumerate(ckpts):
            feat = KroneckerFeaturizer(ck, spec, projection_seed(spec.proj_seed, c))
            parts = [feat.featurize(x0[i : i + 16], draws) for i in range(0, len(x0), 16)]
            PA.append(torch.cat([f.tracin for f in parts]).numpy())
            PR.append(torch.cat([f.retrac for f in parts]).numpy())
            norms.append(torch.cat([f.norms for f in parts]).numpy())
        seconds = time.perf_counter() - t1
        norm_err = float(np.max(np.abs(np.stack(norms, 1) - exact_norms) / exact_norms))
        approx = _scores(np.stack(PA), np.stack(PR), weights, q, t)
        for m in ("tracin", "retrac"):
            row = {"projection": "kronecker", "d": d, "method": m, "project_seconds": None,
                   "featurize_seconds": seconds, "max_rel_norm_error": norm_err}  # fmt: skip
            row.update(_agreement(exact[m], approx[m]))
            results.append(row)
            logger.info("fidelity %s", row)
    fid["rows"] = results
    _save_json(CACHE / "fidelity.json", fid)


def _fidelity_record(results: list, f: dict, weights: list[float], feat_s: float) -> dict:
    return {
        "rows": results,
        "num_train": FIDELITY_N,
        "num_queries": FIDELITY_Q,
        "queries": "generated by the full model (DDPM, 250 steps, seed 1)",
        "num_params": f["p"],
        "checkpoints": list(FULL_CHECKPOINTS),
        "checkpoint_weights": weights,
        "featurize_seconds": feat_s,
        "sjlt_nnz": 4,
    }


# -- index on the full model: timestep bias, general influence, self-retrieval ------------------


def _open_or_build(path: Path, ckpt_dirs: list[Path], images: np.ndarray, weights: list[float]):
    from gradindex.build.pipeline import build_index
    from gradindex.query import AttributionIndex
    from gradindex.spec import BuildSpec

    if (path / "manifest.json").exists():
        return AttributionIndex.open(path)
    spec = BuildSpec(checkpoint_weights=tuple(weights))
    t0 = time.perf_counter()
    resume = (path / "build.json").exists()  # an interrupted build: finish it
    idx = build_index(
        checkpoints=[str(c) for c in ckpt_dirs], data=images, out=path, spec=spec,
        resume=resume, progress=False,
    )  # fmt: skip
    _save_json(path.parent / f"{path.name}_build_seconds.json", {"s": time.perf_counter() - t0})
    return idx


def _concentration_table(idx: Any, qv: dict, ks: tuple[int, ...] = (5, 10, 50)) -> dict:
    from gradindex.eval.report import topk_concentration

    out = {}
    for m in ("tracin", "retrac"):
        res = idx.search(qv[m], k=max(ks), method=m)
        out[m] = {str(k): topk_concentration(res.rows[:, :k]) for k in ks}
    return out


def stage_main() -> None:
    from gradindex.demo.training import load_digits_images
    from gradindex.eval.report import report
    from gradindex.eval.viz import attribution_grid

    ckpt_dirs, weights = _full_checkpoints()
    digits = load_digits_images(16)[:N_MAIN]
    idx = _open_or_build(CACHE / "index_full900", ckpt_dirs, digits, weights)
    queries = generated_queries("full")
    t0 = time.perf_counter()
    qv = idx.embed(queries)
    embed_s = time.perf_counter() - t0
    np.savez(CACHE / "full_query_vectors.npz", **qv)
    rep = report(idx, k=10, out_dir=CACHE / "figs_full", query_vectors=qv)
    for f in rep.pop("figures"):  # rename to the attribution_ prefix
        Path(f).rename(RESULTS / f"attribution_full_{Path(f).name}")
    rep_self = report(idx, k=10)  # training rows as queries, self excluded
    res = {m: idx.search(qv[m][:6], k=8, method=m) for m in ("tracin", "retrac")}
    attribution_grid(
        queries[:6], digits, {m: (r.scores, r.rows) for m, r in res.items()},
        RESULTS / "attribution_full_examples.png",
        query_titles=[f"generated {i}" for i in range(6)],
    )  # fmt: skip
    _save_json(
        CACHE / "main.json",
        {
            "report_generated": rep,
            "report_training_rows": rep_self,
            "concentration_generated": _concentration_table(idx, qv),
            "num_queries": len(queries),
            "query_embed_ms_per_image": 1e3 * embed_s / len(queries),
            "checkpoints": list(FULL_CHECKPOINTS),
            "checkpoint_weights": weights,
            "num_train": len(digits),
            "dim": idx.dim,
        },
    )


# -- planted outliers ---------------------------------------------------------------------------


def stage_outliers() -> None:
    from gradindex.eval.report import norm_by_timestep, plot_reach_vs_norm, reach, sample_norms
    from gradindex.eval.viz import attribution_grid

    cfg = json.loads((CACHE / "outliers" / "train_config.json").read_text())
    ckpt_dirs = [CACHE / "outliers" / f"checkpoint-{s}" for s in cfg["checkpoint_steps"]]
    # the index holds the first N_OUT_INDEX training digits and every outlier (time budget)
    images, labels = outlier_training_set(N_OUT_INDEX)
    idx = _open_or_build(CACHE / "index_outliers548", ckpt_dirs, images, cfg["tracin_weights"])
    heldout = digit_split()[1][:N_OUT_QUERIES]
    probes = np.concatenate([make_outliers(k, 8, SEED + 7) for k in OUTLIER_KINDS])
    probe_kind = np.repeat(OUTLIER_KINDS, 8)
    # generated queries of this model were dropped for time (the full model has 128 of them)
    sets = {"heldout": heldout, "probes": probes}
    qv = {}
    for name, imgs in sets.items():
        qv[name] = idx.embed(imgs)
    is_out = labels != ""
    ks = (5, 10, 50)
    result: dict[str, Any] = {
        "num_train": N_TRAIN_OUT + len(OUTLIER_KINDS) * PER_KIND,
        "num_indexed": len(images),
        "num_outliers": int(is_out.sum()),
        "outlier_fraction_trained": len(OUTLIER_KINDS)
        * PER_KIND
        / (N_TRAIN_OUT + len(OUTLIER_KINDS) * PER_KIND),
        "outlier_fraction": float(is_out.mean()),
        "kinds": list(OUTLIER_KINDS),
        "per_kind": PER_KIND,
        "train_steps": OUTLIER_STEPS,
        "checkpoints": [p.name for p in ckpt_dirs],
        "checkpoint_weights": cfg["tracin_weights"],
        "final_train_loss": cfg.get("final_loss"),
        "num_queries": {k: len(v) for k, v in sets.items()},
        "in_domain": {},
        "probes": {},
        "concentration_heldout": _concentration_table(idx, qv["heldout"]),
    }
    lists = {}
    for m in ("tracin", "retrac"):
        for name in ("heldout",):
            rows = idx.search(qv[name][m], k=max(ks), method=m).rows  # [Q, 50]
            lists[(m, name)] = rows
            entry = {}
            for k in ks:
                hit = is_out[rows[:, :k]]  # [Q, k]
                entry[str(k)] = {
                    "outlier_slot_share": float(hit.mean()),
                    "queries_with_outlier_in_topk": float(hit.any(1).mean()),
                    "by_kind": {
                        kind: float((labels[rows[:, :k]] == kind).mean()) for kind in OUTLIER_KINDS
                    },
                }
            result["in_domain"].setdefault(m, {})[name] = entry
        rows = idx.search(qv["probes"][m], k=10, method=m).rows
        probe = {}
        for kind in OUTLIER_KINDS:
            sel = probe_kind == kind
            same = labels[rows[sel]] == kind  # [8, 10]
            probe[kind] = {
                "top1_same_kind": float(same[:, 0].mean()),
                "top10_same_kind_share": float(same.mean()),
                "top10_any_outlier_share": float(is_out[rows[sel]].mean()),
            }
        result["probes"][m] = probe
    # outliers' gradient norms by timestep, per kind, against the digits
    draw_t = [t for t in idx.manifest["timesteps"] for _ in range(idx.spec.noise_draws)]
    groups = {"digits": ~is_out, **{k: labels == k for k in OUTLIER_KINDS}}
    result["norm_by_timestep"] = {
        g: norm_by_timestep(idx.norms[sel], draw_t) for g, sel in groups.items()
    }
    norms = sample_norms(idx)
    result["mean_norm_over_digits"] = {
        g: float(np.median(norms[sel]) / np.median(norms[~is_out])) for g, sel in groups.items()
    }
    _plot_norms_by_group(result["norm_by_timestep"], RESULTS / "attribution_outliers_norms.png")
    plot_reach_vs_norm(
        {m: reach(lists[(m, "heldout")][:, :10], len(idx)) for m in ("tracin", "retrac")},
        norms, RESULTS / "attribution_outliers_reach.png", highlight=is_out,
        title=f"reach in top-10 of {len(heldout)} held-out digits; red: planted outliers",
    )  # fmt: skip
    res = {m: idx.search(qv["heldout"][m][:4], k=8, method=m) for m in ("tracin", "retrac")}
    attribution_grid(
        heldout[:4], images, {m: (r.scores, r.rows) for m, r in res.items()},
        RESULTS / "attribution_outliers_examples.png",
        query_titles=[f"held-out {i}" for i in range(4)],
    )  # fmt: skip
    _save_json(CACHE / "outliers.json", result)


def _plot_norms_by_group(by_group: dict, path: Path) -> None:
    from gradindex.eval.viz import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for g, st in by_group.items():
        style = {"lw": 2.5, "color": "black"} if g == "digits" else {"lw": 1.2}
        ax.plot(st["timesteps"], st["median"], marker="o", ms=3, label=g, **style)
    ax.set_yscale("log")
    ax.set_xlabel("diffusion timestep t")
    ax.set_ylabel("median per-sample gradient norm")
    ax.set_title("Planted outliers vs digits: gradient norm by timestep", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- replay protocol ----------------------------------------------------------------------------


def _replay_rows(ckpt_dirs: list[Path], weights: list[float], images: np.ndarray,
                 rows: np.ndarray, spec: Any) -> dict[str, np.ndarray]:  # fmt: skip
    """Training side of the paper's protocol: for checkpoint c, each sample's gradients at the
    timesteps it saw in training between checkpoint c-1 and c (from timestep_log.npz), fresh
    noise seeded by (SEED, c, step, slot), one draw each; then aggregated, projected and
    weighted exactly as the index does (TracIn mean, ReTrac mean of unit gradients)."""
    from gradindex.featurize.embedding import projection_seed
    from gradindex.featurize.gradients import GradientFeaturizer
    from gradindex.featurize.losses import noisy_input_and_target
    from gradindex.featurize.projection import make_projector
    from gradindex.inputs.models import load_checkpoints

    log = np.load(CACHE / "full" / "timestep_log.npz")
    cfg = json.loads((CACHE / "full" / "train_config.json").read_text())
    steps = cfg["checkpoint_steps"]
    pos = {int(r): i for i, r in enumerate(rows)}
    ckpts = load_checkpoints([str(c) for c in ckpt_dirs])
    x0_all = torch.from_numpy(images) * 2.0 - 1.0
    tr_blocks, re_blocks, counts = [], [], []
    for c, (ck, w) in enumerate(zip(ckpts, weights, strict=True)):
        end = int(ckpt_dirs[c].name.split("-")[1])
        start = steps[steps.index(end) - 1] if steps.index(end) > 0 else 0
        items = [
            (pos[int(i)], int(t), s, j)
            for s in range(start, end)
            for j, (i, t) in enumerate(zip(log["indices"][s], log["timesteps"][s], strict=True))
            if int(i) in pos
        ]
        f = GradientFeaturizer(ck, spec)
        p = f.num_params
        a = torch.zeros(len(rows), p)
        r = torch.zeros(len(rows), p)
        n = torch.zeros(len(rows))
        for b in range(0, len(items), 64):
            chunk = items[b : b + 64]
            who = torch.tensor([it[0] for it in chunk])
            t = torch.tensor([it[1] for it in chunk])
            eps = torch.stack([
                torch.randn(x0_all.shape[1:], generator=torch.Generator().manual_seed(
                    int(np.random.SeedSequence([SEED, c, it[2], it[3]]).generate_state(1)[0])))
                for it in chunk
            ])  # fmt: skip
            x_t, target = noisy_input_and_target(
                x0_all[rows[who]], eps, t, f.alphas_cumprod, f.prediction_type
            )
            g = f.item_gradients(x_t, t, target)  # [I, p]
            a.index_add_(0, who, g)
            r.index_add_(0, who, g / g.norm(dim=1, keepdim=True))
            n.index_add_(0, who, torch.ones(len(chunk)))
        seen = n > 0
        a[seen] /= n[seen, None]
        r[seen] /= n[seen, None]
        proj = make_projector(spec.projection, p, spec.proj_dim,
                              projection_seed(spec.proj_seed, c), nnz=spec.sjlt_nnz)  # fmt: skip
        pa, pr = proj.project(a), proj.project(r)
        tr_blocks.append(math.sqrt(w) * pa)
        pr_norm = pr.norm(dim=1, keepdim=True).clamp_min(1e-30)
        re_blocks.append(math.sqrt(w) * pr / pr_norm)
        counts.append(n.numpy())
    return {
        "tracin": torch.cat(tr_blocks, 1).numpy(),
        "retrac": torch.cat(re_blocks, 1).numpy(),
        "visits": np.stack(counts, 1),  # [N, C]
    }


def stage_replay_rows() -> None:
    """The replay training rows only (needs no index): cached in replay_rows.npz."""
    from gradindex.demo.training import load_digits_images
    from gradindex.spec import BuildSpec

    ckpt_dirs, weights = _full_checkpoints()
    digits = load_digits_images(16)
    rows = np.sort(np.random.default_rng(SEED).choice(N_MAIN, FIDELITY_N, replace=False))
    # the projection fields of the index's spec ('auto' resolves to these at the demo size)
    spec = BuildSpec(num_train_timesteps=1000, projection="sjlt", precision="float32")
    t0 = time.perf_counter()
    rep = _replay_rows(ckpt_dirs, weights, digits, rows, spec)
    np.savez(CACHE / "replay_rows.npz", seconds=time.perf_counter() - t0, rows=rows, **rep)


def stage_replay() -> None:
    from gradindex.eval.report import topk_concentration
    from gradindex.query import AttributionIndex

    rows = np.sort(np.random.default_rng(SEED).choice(N_MAIN, FIDELITY_N, replace=False))
    cached = CACHE / "replay_rows.npz"
    if not cached.exists():
        stage_replay_rows()
    with np.load(cached) as z:
        rep = {k: z[k] for k in z.files}
    replay_s = float(rep["seconds"])
    idx = AttributionIndex.open(CACHE / "index_full900")
    qv = dict(np.load(CACHE / "full_query_vectors.npz"))
    unseen = rep["visits"].min(1) == 0
    out: dict[str, Any] = {
        "num_train": len(rows),
        "train_rows": "400 training digits (seeded sample of the 900 indexed)",
        "num_queries": len(qv["tracin"]),
        "visits_per_checkpoint_mean": rep["visits"].mean(0).tolist(),
        "rows_unseen_in_some_interval": int(unseen.sum()),
        "seconds": replay_s,
        "protocols": {},
        "agreement_with_grid": {},
    }
    grid = {m: idx.vectors(m)[rows] for m in ("tracin", "retrac")}
    for m in ("tracin", "retrac"):
        scores = {"grid": qv[m] @ grid[m].T, "replay": qv[m] @ rep[m].T}  # [Q, N]
        for proto, sc in scores.items():
            sc = np.where(unseen[None], -np.inf, sc)  # rows without a replay vector: skip both
            order = np.argsort(-sc, axis=1)
            out["protocols"].setdefault(proto, {})[m] = {
                str(k): topk_concentration(order[:, :k]) for k in (5, 10, 50)
            }
        from scipy.stats import spearmanr

        keep = ~unseen
        rho = [
            spearmanr(a[keep], b[keep])[0]
            for a, b in zip(scores["grid"], scores["replay"], strict=True)
        ]
        tg = np.argsort(-scores["grid"][:, keep], 1)[:, :10]
        tp = np.argsort(-scores["replay"][:, keep], 1)[:, :10]
        ov = [len(np.intersect1d(a, b)) / 10 for a, b in zip(tg, tp, strict=True)]
        out["agreement_with_grid"][m] = {
            "spearman": float(np.mean(rho)),
            "top10": float(np.mean(ov)),
        }
    _save_json(CACHE / "replay.json", out)


# -- summary ------------------------------------------------------------------------------------


def _load(name: str) -> dict | None:
    path = CACHE / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine() -> dict[str, Any]:
    import diffusers
    import faiss

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": 1,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "faiss": faiss.__version__,
        "note": "2 shared cores; other benchmarks ran at the same time, so seconds are indicative",
    }


def _plot_fidelity(fid: dict, path: Path) -> None:
    from gradindex.eval.viz import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for (kind, m), style in zip(
        [(k, m) for k in ("sjlt", "gaussian", "kronecker") for m in ("tracin", "retrac")],
        ["o-", "s-", "o--", "s--", "^:", "v:"],
        strict=True,
    ):
        rows = [r for r in fid["rows"] if r["projection"] == kind and r["method"] == m]
        if not rows:
            continue
        d = [r["d"] for r in rows]
        axes[0].plot(d, [r["top10"] for r in rows], style, label=f"{kind} / {m}")
        axes[1].plot(d, [r["spearman"] for r in rows], style, label=f"{kind} / {m}")
    for ax, name, bar in ((axes[0], "top-10 overlap with exact", 0.95),
                          (axes[1], "Spearman with exact scores", 0.99)):  # fmt: skip
        ax.axhline(bar, color="red", lw=0.8, ls=":")
        ax.axvline(4096, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("projected dimension d per checkpoint")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Projection fidelity: {fid['num_queries']} generated queries x {fid['num_train']} "
        f"training digits, {len(fid['checkpoints'])} checkpoints, p = {fid['num_params']:,}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _proj_s(row: dict) -> str:
    if row.get("project_seconds") is None:  # kronecker: projected inside the gradient hooks
        return f"in hooks (featurize {row['featurize_seconds']:.0f} s)"
    return f"{row['project_seconds']:.0f}"


def _fmt(x: float, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def stage_summarize() -> None:
    fid, main_, outl, rep = (_load(n) for n in ("fidelity", "main", "outliers", "replay"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": _machine(),
        "seeds": {"data_split_and_subsets": SEED, "generation": SEED + 1, "train": SEED,
                  "probe_outliers": SEED + 7, "spec": "BuildSpec defaults (seed 0, proj_seed 0)"},
        "fidelity": fid, "main": main_, "outliers": outl, "replay": rep,
    }  # fmt: skip
    md = ["# Attribution benchmark (`benchmarks/bench_attribution.py`)", ""]
    m = out["machine"]
    md += [
        f"Machine: {m['platform']}, {m['cpu_count']} cores (shared), torch {m['torch']} on 1 "
        f"thread, diffusers {m['diffusers']}, faiss {m['faiss']}. Seeds: everything seed 0 "
        "(generation seed 1, probe outliers seed 7); one seed per experiment.",
        "",
    ]
    if fid:
        _plot_fidelity(fid, RESULTS / "attribution_fidelity.png")
        md += [
            "## Projection fidelity (exact = identity projection)",
            "",
            f"{fid['num_queries']} generated queries x {fid['num_train']} training digits, "
            f"checkpoints {', '.join(fid['checkpoints'])} (full model), p = {fid['num_params']:,}"
            f" parameters, K = 10 timesteps, M = 1. Mean over queries (min in brackets).",
            "",
            "| projector | d | method | Spearman | top-10 overlap | top-100 overlap | project s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in fid["rows"]:
            md.append(
                f"| {r['projection']} | {r['d']} | {r['method']} | {_fmt(r['spearman'], 4)} "
                f"({_fmt(r['spearman_min'])}) | {_fmt(r['top10'])} ({_fmt(r['top10_min'], 1)}) | "
                f"{_fmt(r['top100'])} ({_fmt(r['top100_min'], 2)}) | {_proj_s(r)} |"
            )
        md.append("")
    if main_:
        g = main_["report_generated"]
        nb = g["norm_by_timestep"]
        md += [
            f"## Timestep bias (full model; index over the first {main_['num_train']} of its "
            f"1,797 training digits, sjlt d=4096, checkpoints {', '.join(main_['checkpoints'])})",
            "",
            "| timestep | " + " | ".join(str(t) for t in nb["timesteps"]) + " |",
            "|---|" + "---|" * len(nb["timesteps"]),
            "| median norm | " + " | ".join(f"{v:.3g}" for v in nb["median"]) + " |",
            "| p90/p10 within t | "
            + " | ".join(f"{v:.2f}" for v in nb["within_timestep_p90_over_p10"])
            + " |",
            "",
            f"Spread across timesteps: max/min of per-timestep medians = "
            f"{nb['median_max_over_min']:.1f}x; p90/p10 of the medians = "
            f"{nb['median_p90_over_p10']:.1f}x.",
            "",
            "Reach (appearances in the top-10 lists of "
            f"{g['num_queries']} generated queries) vs the sample's mean gradient norm, Spearman: "
            + ", ".join(
                f"{mm} {_fmt(g['methods'][mm]['reach_vs_norm']['spearman_all'], 2)} (all rows), "
                f"{_fmt(g['methods'][mm]['reach_vs_norm']['spearman_reached'], 2)} (rows reached)"
                for mm in ("tracin", "retrac")
            ),
            "",
            "## Generally influential samples",
            "",
            f"Full model: {main_['num_queries']} generated queries.",
            "",
            *_conc_table(main_["concentration_generated"]),
            "",
        ]
    if outl:
        md += [
            f"Outlier model, {outl['num_queries']['heldout']} held-out digits as queries:",
            "",
            *_conc_table(outl["concentration_heldout"]),
            "",
        ]
    if main_:
        md += ["## Self-retrieval (stored row of a training image as the query)", "",
               "| index | method | rank 1 | in top 10 | rows |", "|---|---|---|---|---|"]  # fmt: skip
        for mm in ("tracin", "retrac"):
            sr = main_["report_generated"]["methods"][mm]["self_retrieval"]
            md.append(f"| full model | {mm} | {sr['rank1']:.3f} | {sr['top10']:.3f} | "
                      f"{sr['num_rows']} |")  # fmt: skip
        md.append("")
    if outl:
        md += [
            "## Planted outliers",
            "",
            f"Trained on {outl['num_train']} images = 1,000 digits + {outl['num_outliers']} "
            f"outliers ({100 * outl['outlier_fraction_trained']:.1f}%: {outl['per_kind']} each "
            f"of {', '.join(outl['kinds'])}); {outl['train_steps']} training steps (half the "
            f"demo's 1,200, for time), checkpoints {', '.join(outl['checkpoints'])}. For time the "
            f"index holds {outl['num_indexed']} of them: the first 500 digits and every outlier "
            f"({100 * outl['outlier_fraction']:.1f}% outliers). Queries: "
            f"{outl['num_queries']['heldout']} held-out digits (never trained on).",
            "",
            "Share of top-k slots taken by outliers, in-domain queries (chance = "
            f"{outl['outlier_fraction']:.3f}):",
            "",
            "| queries | k | TracIn | ReTrac | TracIn: queries with any outlier | ReTrac: same |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("heldout",):
            for k in ("5", "10", "50"):
                t, r = outl["in_domain"]["tracin"][name][k], outl["in_domain"]["retrac"][name][k]
                md.append(
                    f"| {name} ({outl['num_queries'][name]}) | {k} | {t['outlier_slot_share']:.3f} "
                    f"| {r['outlier_slot_share']:.3f} | {t['queries_with_outlier_in_topk']:.2f} | "
                    f"{r['queries_with_outlier_in_topk']:.2f} |"
                )
        md += ["", "By kind, top-10, held-out queries (share of slots):", "",
               "| kind | TracIn | ReTrac | median norm / digits' |", "|---|---|---|---|"]  # fmt: skip
        for kind in outl["kinds"]:
            t = outl["in_domain"]["tracin"]["heldout"]["10"]["by_kind"][kind]
            r = outl["in_domain"]["retrac"]["heldout"]["10"]["by_kind"][kind]
            md.append(f"| {kind} | {t:.3f} | {r:.3f} | {outl['mean_norm_over_digits'][kind]:.2f} |")
        md += ["", "Outlier-like probes (8 fresh images per kind): do they find their kind?", "",
               "| kind | TracIn top-1 same kind | ReTrac top-1 | TracIn top-10 share | ReTrac |",
               "|---|---|---|---|---|"]  # fmt: skip
        for kind in outl["kinds"]:
            t, r = outl["probes"]["tracin"][kind], outl["probes"]["retrac"][kind]
            md.append(f"| {kind} | {t['top1_same_kind']:.2f} | {r['top1_same_kind']:.2f} | "
                      f"{t['top10_same_kind_share']:.2f} | {r['top10_same_kind_share']:.2f} |")  # fmt: skip
        md.append("")
    if rep:
        md += [
            "## Replay protocol vs grid (training side only; test side = grid)",
            "",
            f"{rep['train_rows']}, {rep['num_queries']} "
            f"generated queries; replay = the timesteps each sample saw in the 300 steps before "
            f"each checkpoint (mean {', '.join(f'{v:.1f}' for v in rep['visits_per_checkpoint_mean'])}"
            f" visits per checkpoint; {rep['rows_unseen_in_some_interval']} rows unseen in an "
            "interval are left out of both).",
            "",
            "| protocol | method | k=10 distinct | k=10 top-10 share | k=50 distinct | "
            "k=50 top-10 share |",
            "|---|---|---|---|---|---|",
        ]
        for proto in ("grid", "replay"):
            for mm in ("tracin", "retrac"):
                c = rep["protocols"][proto][mm]
                md.append(f"| {proto} | {mm} | {c['10']['distinct']} | {c['10']['top10_share']:.3f} "
                          f"| {c['50']['distinct']} | {c['50']['top10_share']:.3f} |")  # fmt: skip
        md += ["", "Agreement of replay with grid scores: " + ", ".join(
            f"{mm} Spearman {v['spearman']:.3f}, top-10 overlap {v['top10']:.2f}"
            for mm, v in rep["agreement_with_grid"].items()), ""]  # fmt: skip
    else:
        md += ["## Replay protocol", "", "Not run.", ""]
    (RESULTS / "attribution.md").write_text("\n".join(md) + "\n")
    _save_json(RESULTS / "attribution.json", out)


def _conc_table(conc: dict) -> list[str]:
    lines = ["| k | TracIn distinct | ReTrac distinct | ReTrac/TracIn | TracIn top-10 share | "
             "ReTrac top-10 share |", "|---|---|---|---|---|---|"]  # fmt: skip
    for k in ("5", "10", "50"):
        t, r = conc["tracin"][k], conc["retrac"][k]
        lines.append(
            f"| {k} | {t['distinct']} / {t['slots']} | {r['distinct']} | "
            f"{r['distinct'] / t['distinct']:.2f} | {t['top10_share']:.3f} | {r['top10_share']:.3f} |"
        )
    return lines


STAGES = {
    "train-full": stage_train_full,
    "train-outliers": stage_train_outliers,
    "queries": stage_queries,
    "fidelity": stage_fidelity,
    "fidelity-kronecker": stage_fidelity_kronecker,
    "main": stage_main,
    "outliers": stage_outliers,
    "replay-rows": stage_replay_rows,
    "replay": stage_replay,
    "summarize": stage_summarize,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "all"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _threads()
    CACHE.mkdir(parents=True, exist_ok=True)
    for name in STAGES if args.stage == "all" else [args.stage]:
        t0 = time.perf_counter()
        STAGES[name]()
        logger.info("stage %s: %.0f s", name, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
