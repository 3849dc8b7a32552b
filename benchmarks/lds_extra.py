"""bench_lds.py's hardening helpers: the influence method's query rows, the seed-noise ceiling,
the declared primary comparison (and its lines in lds.md) and the per-row calibration LDS.

Kept apart from bench_lds.py (which is long already); every function takes what it needs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from gradindex.eval.lds import bootstrap_ci, lds_per_target, spearman_rows
from gradindex.query_influence import add_factors, embed_influence

INFLUENCE_LABEL = "EK-FAC influence (mse)"
DAMPING_LABEL = "EK-FAC influence (mse), damping 10 (best of 0.1-10^4 on calibration)"
INFLUENCE_DAMPING = {INFLUENCE_LABEL: 0.1, DAMPING_LABEL: 10.0}
"""The damping of each influence row: the default, and the best on the calibration digits
(0.1 / 1 / 10 / 100 / 10^4 gave 0.418 / 0.495 / 0.503 / 0.497 / 0.480 on 13 subsets; the
targets never consulted)."""
DECLARED = "lds_primary_declared.json"


def influence_embeddings(
    idx,
    cache: Path,
    name: str,
    train: np.ndarray,
    targets: np.ndarray,
    calib: np.ndarray,
    damping: float = 0.1,
    factor_seed: int = 0,
) -> dict[str, np.ndarray]:
    """The 'influence' query rows of the targets and calibration digits of index ``idx``
    (factors computed from every training digit first, seeded by ``factor_seed``, when the
    index has none), cached in ``cache/embed/<name>-influence.npz``."""
    suffix = "" if damping == 0.1 else f"-d{damping:g}"
    path = cache / "embed" / f"{name}-influence{suffix}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    started = time.perf_counter()
    if not isinstance(idx.manifest.get("factors"), dict):
        add_factors(idx, train, seed=factor_seed)
    factor_seconds = float(idx.manifest["factors"]["seconds"])
    out = {
        "target_influence": embed_influence(idx, targets, damping),
        "calib_influence": embed_influence(idx, calib, damping),
        "factor_seconds": np.asarray(factor_seconds),
        "seconds": np.asarray(time.perf_counter() - started),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def seed_ceiling(per_seed: np.ndarray, boot: int) -> dict:
    """How well one training seed's outputs predict the mean of the other seeds' outputs.

    per_seed: mean losses [T, S, seeds]. Per target: the Spearman over subsets between seed
    j's losses and the other seeds' mean, averaged over j (an LDS-like score of a predictor
    that knows a whole retraining). Returns {"per_target" [T], "all": ci dict, "seeds"}."""
    k = per_seed.shape[-1]
    per = np.mean(
        [
            spearman_rows(per_seed[..., j], np.delete(per_seed, j, axis=-1).mean(axis=-1))
            for j in range(k)
        ],
        axis=0,
    )
    return {"per_target": per, "ci": bootstrap_ci(per, boot).to_dict(), "seeds": int(k)}


def ceiling_record(per_seed: np.ndarray, groups: np.ndarray, boot: int) -> dict:
    """The seed-noise ceiling, all targets and per group (JSON-ready)."""
    c = seed_ceiling(per_seed, boot)
    per = c["per_target"]
    return {
        "seeds": c["seeds"],
        "all": c["ci"],
        "heldout": bootstrap_ci(per[groups == 0], boot).to_dict(),
        "generated": bootstrap_ci(per[groups == 1], boot).to_dict(),
        "what": "Spearman over subsets between one training seed's losses and the mean of the "
        "other seeds' losses, averaged over seeds and targets",
    }


def calibration_lds(scores: np.ndarray, m: np.ndarray, calib_losses: np.ndarray) -> float:
    """Mean LDS on the calibration digits (their scores [Tc, N])."""
    return float(np.nanmean(lds_per_target(scores, m, calib_losses)))


def read_declared(results: Path) -> dict:
    """The primary comparison declared (and committed) before the run."""
    path = results / DECLARED
    if not path.exists():
        raise SystemExit(f"{path}: declare the primary comparison before the report")
    return json.loads(path.read_text())


def primary_record(
    declared: dict, per_target: dict[str, np.ndarray], groups: np.ndarray, boot: int
) -> dict:
    """lds.json's ``primary``: the declared method's paired difference against the declared
    reference on each target group, with its 95% bootstrap interval over targets."""
    a, b = declared["method"], declared["reference"]
    out = {"method": a, "reference": b, "K": declared["K"], "declared_in": DECLARED}
    if a not in per_target or b not in per_target:
        out["missing"] = [x for x in (a, b) if x not in per_target]
        return out
    for g, key in ((0, "held_out"), (1, "generated")):
        d = bootstrap_ci((per_target[a] - per_target[b])[groups == g], boot)
        out[key] = {
            "diff": d.mean,
            "ci": [d.low, d.high],
            "goal": declared["goal"],
            "met": bool(d.mean >= declared["goal"] and d.low > 0),
        }
    return out


def primary_lines(r: dict) -> list[str]:
    """The declared primary comparison and the seed-noise ceiling, first in lds.md."""
    c, p = r["ceiling"], r.get("primary", {})
    out = [
        f"**Seed-noise ceiling** ({c['seeds']} training seeds per subset model; {c['what']}): "
        f"all {c['all']['mean']:.3f} [{c['all']['ci_low']:.3f}, {c['all']['ci_high']:.3f}], "
        f"held-out {c['heldout']['mean']:.3f}, generated {c['generated']['mean']:.3f}. "
        "The measured outputs are the mean over the seeds; a method predicting that mean can "
        "exceed this single-retraining predictor (rows with a negative 'ceiling − LDS').",
        "",
        "'EK-FAC influence (mse)': method `influence` on the mse index: the query gradient "
        "preconditioned per layer by EK-FAC factors of the GGN (sampled targets, every training "
        "digit once, one (t, ε) draw each), damping 0.1 × the layer's mean eigenvalue, then "
        "projected and searched on the TracIn rows.",
        "",
        f"**Primary comparison, declared before the run** (`results/{p.get('declared_in')}`): "
        f"{p.get('method')} − {p.get('reference')} at {p.get('K')}, paired over targets:",
        "",
    ]
    for key, label in (("held_out", "held-out digits"), ("generated", "generated")):
        d = p.get(key)
        if d is None:
            out.append(f"- {label}: not computed ({', '.join(p.get('missing', []))} missing)")
            continue
        verdict = "goal met" if d["met"] else f"short of the +{d['goal']:.2f} goal by "
        verdict += "" if d["met"] else f"{d['goal'] - d['diff']:.3f} (or its interval reaches 0)"
        out.append(f"- {label}: {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]: {verdict}")
    return [*out, ""]
