"""What an index folder's manifest records, checked against the spec, the store and the
checkpoints given at query time, and summarised for ``AttributionIndex.info`` / ``gradindex info``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gradindex.errors import IndexStateError, ModelError
from gradindex.inputs.models import Checkpoint, CheckpointSource, load_checkpoints
from gradindex.spec import BuildSpec


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
                f"{mpath}: records {key} {got!r} but the index's spec / vectors say {want!r} "
                "(the manifest was edited); restore it or rebuild the index"
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
        "checkpoints": m["checkpoints"],
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
        "factors": m.get("factors"),  # method 'influence' (gradindex factors), None without
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
    if sources is None:
        memory = [r["source"] for r in records if r["source"].startswith("memory:")]
        if memory:
            raise ModelError(
                "this index was built from in-memory models: pass them to "
                "AttributionIndex.open(path, checkpoints=[(model, scheduler), ...])"
            )
        sources = [r["source"] for r in records]
    if len(sources) != len(records):
        raise ModelError(f"the index has {len(records)} checkpoints but {len(sources)} were given")
    precondition = manifest["spec"].get("precondition", "none")
    ckpts = load_checkpoints(list(sources), scheduler, base_model, precondition)
    changed = "the weights or their optimizer state" if precondition == "adam" else "the weights"
    check_fingerprints(ckpts, records, f"{changed} changed; rebuild the index")
    return ckpts


def check_fingerprints(ckpts: list[Any], records: list[dict[str, Any]], what: str) -> None:
    """Refuse checkpoints whose weight fingerprint differs from the manifest's record of it,
    naming the first one; ``what``: the reason and what to do."""
    for i, (c, r) in enumerate(zip(ckpts, records, strict=True)):
        if c.fingerprint != r["fingerprint"]:
            raise ModelError(
                f"checkpoint {i} ({c.source}) has fingerprint {c.fingerprint} but the index was "
                f"built with {r['fingerprint']}: {what}"
            )
