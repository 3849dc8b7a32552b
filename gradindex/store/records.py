"""What an index folder's manifest records, checked against the spec, the store and the
checkpoints given at query time, and summarised for ``AttributionIndex.info`` / ``gradindex info``."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError, ModelError
from gradindex.inputs.components import checkpoint_config
from gradindex.inputs.models import Checkpoint, CheckpointSource, load_checkpoints
from gradindex.spec import BuildSpec
from gradindex.store.layout import show_value

REQUIRED = {"indexes": dict, "versions": dict, "prediction_type": str}
"""Records every index of this format has, with their types."""
OPTIONAL = ("conditioning", "kernel", "factors", "run_records", "auto", "fidelity", "featurize")
"""Records an older build may lack (absent or null), each a mapping where present."""


def check_structure(mpath: Path, manifest: dict[str, Any]) -> None:
    """The records ``info`` and a query read must have their types (an edited manifest with a
    record removed, or a number where a mapping belongs, ended ``info`` in a traceback)."""

    def refuse(key: str, what: str) -> None:
        raise IndexStateError(
            f"{mpath}: {key} is {show_value(manifest.get(key))}, not {what}; the manifest was "
            "altered: restore it or rebuild the index"
        )

    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            refuse(key, "a mapping" if kind is dict else "a string")
    if not all(isinstance(v, dict) for v in manifest["indexes"].values()):
        refuse("indexes", "a mapping of records")
    for key in OPTIONAL:
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            refuse(key, "a mapping")
    cond = manifest.get("conditioning") or {"kind": "none"}
    if not isinstance(cond.get("kind"), str):
        refuse("conditioning", "a record with its kind")
    kernel = manifest.get("kernel") or {"skipped": ""}
    if "skipped" not in kernel and not (
        isinstance(kernel.get("rows"), int) and isinstance(kernel.get("rule"), str)
    ):
        refuse("kernel", "a record with its rows and rule")


def check_records(
    mpath: Path, manifest: dict[str, Any], spec: BuildSpec, flagged: np.ndarray
) -> None:
    """The manifest's records that follow from the (fingerprint-checked) spec and the store
    must agree with them: an edited timestep list, checkpoint weight or flagged count would
    make ``info`` describe another index than the one that answers."""
    ckpts = manifest.get("checkpoints")
    if not isinstance(ckpts, list) or not ckpts or not all(isinstance(c, dict) for c in ckpts):
        raise IndexStateError(f"{mpath}: no readable checkpoint records; restore or rebuild it")
    found = {
        "timesteps": manifest.get("timesteps"),
        "checkpoint weights": [c.get("weight") for c in ckpts],
        "num_flagged": manifest.get("num_flagged", 0),
    }
    expected = {
        "timesteps": spec.timestep_values(),
        "checkpoint weights": list(spec.weights(len(ckpts))),
        "num_flagged": int(flagged.sum()),
    }
    for key, want in expected.items():
        got = found[key]
        same = got == want or (
            key == "checkpoint weights"
            and all(isinstance(g, (int, float)) for g in got)
            and np.allclose(got, want, rtol=1e-6, atol=0)
        )
        if not same:
            raise IndexStateError(
                f"{mpath}: records {key} {show_value(got)} but the index's spec / vectors say "
                f"{show_value(want)} "
                "(the manifest was edited); restore it or rebuild the index"
            )


def check_shapes(
    mpath: Path, manifest: dict[str, Any], sample_shape: Any, image_shape: Any
) -> None:
    """The manifest's sample / image shapes must be the loaded model's (and its VAE's): query
    images are resized to ``image_shape``, so an edited one would allocate at will."""
    found = {"sample_shape": list(sample_shape), "image_shape": list(image_shape)}
    for key, want in found.items():
        got = manifest.get(key, manifest["sample_shape"])
        if list(got) != want:
            raise IndexStateError(
                f"{mpath}: {key} {got} but the checkpoints' model takes {want} (the manifest "
                "was altered); restore it or rebuild the index"
            )


def summary(path: Path, manifest: dict[str, Any], conditioning: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of an index, JSON-able: rows, dimensions, checkpoints, spec,
    indexes, versions, conditioning, fidelity, kernel (None where an older build lacks it)."""
    m = manifest
    return {
        "path": str(path),
        "num_rows": m["num_rows"],
        "num_flagged": m.get("num_flagged", 0),
        "dim": m["dim"],
        "proj_dim": m["proj_dim"],
        "num_params": m["num_params"],
        "layers": m.get("layers", {}),
        "featurize": m.get("featurize"),  # the featurize path (None: built before, full)
        "checkpoints": m["checkpoints"],
        "weights": m.get("weights"),  # raw / ema; None for indexes built before it was recorded
        "timesteps": m["timesteps"],
        "prediction_type": m["prediction_type"],
        "spec": m["spec"],
        "indexes": m["indexes"],
        "versions": m["versions"],
        "build_seconds": m.get("build_seconds"),
        "data_seconds": m.get("data_seconds"),  # a build's own: reading vs waiting for data
        "conditioning": conditioning,
        "fidelity": m.get("fidelity"),  # None for indexes built before it was measured
        "kernel": m.get("kernel"),  # None for indexes built before it (gradindex kernel)
        "run_records": m.get("run_records"),  # what the build took from the run's records
        "factors": m.get("factors"),  # method 'influence' (gradindex factors), None without
        "auto": m.get("auto"),  # what 'auto' decided and why; None: nothing was left to it
    }


def recorded_checkpoints(
    manifest: dict[str, Any],
    sources: list[CheckpointSource] | None,
    scheduler: Any,
    base_model: Any,
) -> list[Checkpoint]:
    """The index's checkpoints, loaded from ``sources`` (default: the recorded ones), refused
    unless their weights' fingerprints are those the index was built with."""
    records = manifest["checkpoints"]
    given_sources = sources is not None
    if sources is None:
        memory = [r["source"] for r in records if r["source"].startswith("memory:")]
        if memory:
            raise ModelError(
                "this index was built from in-memory models: pass them to "
                "AttributionIndex.open(path, checkpoints=[(model, scheduler), ...])"
            )
        sources = [r["source"] for r in records]
        for i, src in enumerate(sources):  # moved since the build: say how to point at it
            if not Path(src).exists():
                raise ModelError(
                    f"checkpoint {i} of the index, {src}, is gone; if it moved, give the "
                    "checkpoint folders' new places in build order (query / serve --checkpoint "
                    "DIR, once each; AttributionIndex.open(path, checkpoints=[...]))"
                )
    check_given_sources(manifest, sources)
    precondition = manifest["spec"].get("precondition", "none")
    scheduler = scheduler if scheduler is not None else recorded_scheduler(records)
    weights = manifest.get("weights")  # None: built before the choice was recorded
    ckpts = load_checkpoints(list(sources), scheduler, base_model, precondition, weights)
    changed = "the weights or their optimizer state" if precondition == "adam" else "the weights"
    given = "not this index's checkpoint; give its folders in build order"
    check_fingerprints(
        ckpts, records, given if given_sources else f"{changed} changed; rebuild the index"
    )
    return ckpts


def check_given_sources(manifest: dict[str, Any], sources: list[CheckpointSource] | None) -> None:
    """What can be checked of checkpoints given for an index without loading them: their count,
    and that each folder exists, so ``serve --checkpoint`` fails at start, not at a first query
    (None: the recorded ones, checked when loaded)."""
    if sources is None:
        return
    records = manifest["checkpoints"]
    if len(sources) != len(records):
        raise ModelError(f"the index has {len(records)} checkpoints but {len(sources)} were given")
    for i, src in enumerate(sources):
        if isinstance(src, str | os.PathLike) and not Path(src).exists():
            raise ModelError(f"checkpoint {i}, {src}: no such checkpoint folder")


def recorded_scheduler(records: list[dict[str, Any]]) -> str | None:
    """The noise-scheduler folder every checkpoint of the build used, when it was one folder
    that still exists: a ``--scheduler`` given at build time is given again (it wins over the
    run's own), so a query's rows are computed as the stored ones were."""
    found = {r.get("scheduler") for r in records}
    if len(found) != 1:
        return None
    (where,) = found
    return where if isinstance(where, str) and Path(where).is_dir() else None


def check_fingerprints(ckpts: list[Any], records: list[dict[str, Any]], what: str) -> None:
    """Refuse checkpoints whose weight fingerprint differs from the manifest's record of it,
    naming the first one (``what``: the reason and what to do), or whose config or noise
    schedule changed since the build (``check_configs``)."""
    for i, (c, r) in enumerate(zip(ckpts, records, strict=True)):
        if c.fingerprint != r["fingerprint"]:
            raise ModelError(
                f"checkpoint {i} ({c.source}) has fingerprint {c.fingerprint} but the index was "
                f"built with {r['fingerprint']}: {what}"
            )
    check_configs(ckpts, records)


def check_configs(ckpts: list[Any], records: list[dict[str, Any]]) -> None:
    """Refuse a checkpoint whose model config (config.json, LoRA settings) or noise schedule
    (scheduler_config.json) differs from the build's: same weights, other gradients. Indexes
    built before configs were recorded open with one warning that this cannot be checked."""
    if any(not isinstance(r.get("config"), dict) for r in records):
        warnings.warn(
            "this index was built before checkpoint configs were recorded: only the weights are "
            "checked, not the model's config.json or the scheduler_config.json",
            stacklevel=4,
        )
        return
    for i, (c, r) in enumerate(zip(ckpts, records, strict=True)):
        changes = config_changes(r["config"], checkpoint_config(c.model, c.scheduler))
        if changes:
            raise ModelError(
                f"checkpoint {i} ({c.source}): {'; '.join(changes)} since the index was built "
                "(the same weights give other gradients than the stored rows'): restore them, "
                "or rebuild the index"
            )


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between a checkpoint's recorded config and its config now: model config
    keys (those both sides have), and the noise schedule with the scheduler keys behind it."""
    changes = []
    keys = _changed(recorded.get("model") or {}, current["model"])
    if keys:
        changes.append(f"its model config changed ({keys})")
    if recorded.get("noise_schedule") != current["noise_schedule"]:
        keys = _changed(recorded.get("scheduler") or {}, current["scheduler"])
        changes.append(
            "its noise schedule changed" + (f" (scheduler config: {keys})" if keys else "")
        )
    return changes


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'key: old -> new' for the first keys both dicts hold with other values."""
    keys = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    text = ", ".join(f"{k}: {_short(old[k])} -> {_short(new[k])}" for k in keys[:3])
    return text + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
