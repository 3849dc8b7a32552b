"""The demo: a real diffusion model trained here, attributed end to end, with pictures.

Holds ``run_demo``: train a small DDPM on scikit-learn's digits (or reuse a finished run),
build a TracIn + ReTrac index over every training image at its checkpoints, generate new
digits, query them, and write ``attribution.png``, ``timestep_norms.png`` and ``summary.json``.
Everything runs on CPU in minutes with nothing downloaded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.build.pipeline import build_index
from gradindex.demo.sampling import sample_images
from gradindex.demo.training import load_digits_images, small_unet_config, train_ddpm
from gradindex.errors import IndexStateError
from gradindex.eval.viz import attribution_grid, timestep_norm_plot
from gradindex.query import INFLUENCE, SEARCH_METHODS, AttributionIndex, stored_method
from gradindex.search.backend import SearchResult
from gradindex.spec import BuildSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; ``quick()`` gives a seconds-long version for tests."""

    num_train: int | None = None  # None: all 1,797 digits
    image_size: int = 16
    train_steps: int = 1200
    checkpoint_every: int = 400  # checkpoints at 400, 800, 1200
    unet_config: dict | None = None  # None: the trainer's small default
    # K = 6 timesteps (the default spec has 10) keeps the whole demo short on a small CPU (timings: docs/demo.md)
    spec: BuildSpec = field(default_factory=lambda: BuildSpec(timesteps=6))
    num_queries: int = 32  # generated images queried (statistics over all of them)
    # queries embedded this many at a time: half the work buffers of the build's batch of 16
    # (the step that held the demo's peak memory); each image's rows are its own either way
    query_batch: int = 8
    num_shown: int = 8  # rows in attribution.png
    k: int = 6
    sample_steps: int = 250  # DDPM ancestral sampling steps for the generated queries
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            num_train=48,
            image_size=8,
            train_steps=9,
            checkpoint_every=3,
            unet_config=small_unet_config(
                sample_size=8, block_out_channels=(8, 16, 16), norm_num_groups=4
            ),
            spec=BuildSpec(proj_dim=64, timesteps=2, batch_size=16),
            num_queries=4,
            num_shown=3,
            k=3,
            sample_steps=10,
        )


def run_demo(
    out: str | Path, settings: DemoSettings | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every stage into ``out`` and return the summary (also written to summary.json)."""
    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    t0 = time.perf_counter()
    images = load_digits_images(s.image_size)
    if s.num_train is not None:
        images = images[: s.num_train]
    np.save(out / "train.npy", images)  # the training images, for 'gradindex serve --data'
    run = train_ddpm(
        images,
        out / "model",
        steps=s.train_steps,
        checkpoint_every=s.checkpoint_every,
        seed=s.seed,
        unet_config=s.unet_config,
        progress=progress,
    )
    stages["train_s"] = time.perf_counter() - t0
    train_cfg = json.loads((out / "model" / "train_config.json").read_text())
    spec = s.spec.replace(checkpoint_weights=tuple(train_cfg["tracin_weights"]))

    t0 = time.perf_counter()
    idx = _open_or_build(out / "index", run.checkpoints, images, spec, progress)
    stages["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    queries = sample_images(
        out / "model", s.num_queries, seed=s.seed + 1, num_inference_steps=s.sample_steps
    )
    stages["generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vecs = idx.embed(queries, batch_size=s.query_batch)
    embed_s = time.perf_counter() - t0
    stages["query_embed_s"] = embed_s
    results, search_ms = _search_timed(idx, vecs, s.k)

    shown = slice(0, min(s.num_shown, len(queries)))
    attribution_grid(
        queries[shown],
        images,
        {m: (results[m].scores[shown], results[m].rows[shown]) for m in results},
        out / "attribution.png",
        query_titles=[f"generated {i}" for i in range(len(queries))][shown],
        train_labels=_digit_labels(len(images)),  # ids are row numbers: the data is an array
        weights=spec.checkpoint_weights,
    )
    draw_t = [t for t in idx.spec.timestep_values() for _ in range(idx.spec.noise_draws)]
    timestep_norm_plot(
        idx.norms, draw_t, out / "timestep_norms.png",
        checkpoint_labels=[Path(c).name for c in run.checkpoints],
    )  # fmt: skip

    summary = {
        "num_train": len(images),
        "checkpoints": [Path(c).name for c in run.checkpoints],
        "final_train_loss": float(np.mean(run.losses[-50:])) if run.losses else None,
        "spec": spec.to_dict(),
        "index_dim": idx.dim,
        "index_bytes": _folder_bytes(out / "index"),
        "num_queries": len(queries),
        "k": s.k,
        "query_embed_ms_per_image": 1e3 * embed_s / len(queries),
        "search_ms_per_query": search_ms,
        "distinct_in_topk": {m: int(np.unique(results[m].rows).size) for m in results},
        "topk_slots": len(queries) * s.k,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "settings": {k: v for k, v in asdict(s).items() if k not in ("spec", "unet_config")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _search_timed(
    idx: AttributionIndex, vecs: dict[str, np.ndarray], k: int
) -> tuple[dict[str, SearchResult], dict[str, float]]:
    """Each method's top-k of every query vector, and its search time per single query (ms,
    after a warm-up)."""
    results, search_ms = {}, {}
    for method in [m for m in SEARCH_METHODS if m != INFLUENCE]:  # a column per method (the
        q = vecs[stored_method(method)]  # demo has no influence factors); the kernel ones from
        # the TracIn / ReTrac rows with the kernel's transform
        idx.search(q[:1], k, method)  # warm-up (the kernel methods read kernel.h5 here)
        t0 = time.perf_counter()
        for i in range(len(q)):
            idx.search(q[i : i + 1], k, method)
        search_ms[method] = 1e3 * (time.perf_counter() - t0) / len(q)
        results[method] = idx.search(q, k, method)
    return results, search_ms


def _open_or_build(path: Path, checkpoints: list[Path], images: np.ndarray, spec: BuildSpec,
                   progress: bool) -> AttributionIndex:  # fmt: skip
    """Reuse a finished index built with the same spec; otherwise (re)build it."""
    try:
        idx = AttributionIndex.open(path)
        built = idx.spec.replace(num_train_timesteps=None, data_range=None)
        if built.answers(spec) and len(idx) == len(images):
            logger.info("reusing the finished index in %s", path)
            return idx
    except IndexStateError:
        pass
    return build_index(checkpoints=[str(c) for c in checkpoints], data=images, out=path, spec=spec,
                       overwrite=True, progress=progress)  # fmt: skip


def _digit_labels(n: int) -> np.ndarray:
    """The class (0-9) of the first n digits, in the order load_digits_images returns them."""
    from sklearn.datasets import load_digits

    return load_digits().target[:n]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_summary(summary: dict[str, Any]) -> str:
    """A short table for the terminal."""
    st = summary["stages_s"]
    lines = [
        f"trained on {summary['num_train']} digits, checkpoints {', '.join(summary['checkpoints'])}",
        f"{'stage':<28}{'seconds':>10}",
        *(f"{k.removesuffix('_s'):<28}{v:>10.1f}" for k, v in st.items()),
        f"index: {summary['index_dim']} dims/row, {summary['index_bytes'] / 1e6:.1f} MB on disk",
        f"query: {summary['query_embed_ms_per_image']:.0f} ms/image to embed, "
        + ", ".join(f"{m} search {v:.2f} ms" for m, v in summary["search_ms_per_query"].items()),
        f"distinct training images in {summary['num_queries']} top-{summary['k']} lists "
        f"({summary['topk_slots']} slots): "
        + ", ".join(f"{m} {v}" for m, v in summary["distinct_in_topk"].items()),
    ]
    return "\n".join(lines)
