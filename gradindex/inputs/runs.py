"""The folders diffusers' example trainers leave, and which weights each one holds.

Holds:
- ``WEIGHTS``: the kinds of weights a build may use for every checkpoint: ``raw`` (what the
  optimizer stepped: the weights TracIn's sum runs over) or ``ema`` (the exponential moving
  average ``--use_ema`` keeps: what generated the run's images).
- ``model_folder(folder, weights)``: the model folder to load for a checkpoint folder and the
  kind of weights it holds, refusing a folder that holds the other kind.
- ``scheduler_folders(folder)``: where the run keeps its noise scheduler.

The layout (``train_unconditional.py``, ``train_text_to_image.py``): accelerate's
``save_state`` writes ``OUTPUT/checkpoint-<step>/`` with ``unet/`` (raw weights),
``optimizer.bin``, ``scheduler.bin`` (the learning-rate scheduler) and ``random_states_0.pkl``;
with ``--use_ema`` its save hook adds ``unet_ema/`` (``EMAModel.save_pretrained``). The final
save writes the pipeline into ``OUTPUT`` itself (``unet/``, ``scheduler/``: the noise
scheduler), with the EMA weights copied into ``unet/`` when ``--use_ema`` was given: an EMA
run's raw final weights are not saved outside its last ``checkpoint-<step>/``.
"""

from __future__ import annotations

from pathlib import Path

from gradindex.errors import ModelError

WEIGHTS = ("raw", "ema")
EMA_FOLDER = "unet_ema"


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").exists()


def is_ema_run(run: Path) -> bool:
    """An output folder whose ``checkpoint-<step>/`` hold ``unet_ema/``: trained with
    ``--use_ema``, so its own ``unet/`` holds the EMA weights."""
    return any(_is_model(c / EMA_FOLDER) for c in run.glob("checkpoint-*"))


def _is_run(folder: Path) -> bool:
    """A training run's folder: an accelerate checkpoint or an output folder holding some."""
    return (
        folder.name.startswith("checkpoint-")
        or (folder / "optimizer.bin").exists()
        or next(folder.glob("checkpoint-*"), None) is not None
    )


def weights_kind(folder: Path) -> tuple[Path, str | None]:
    """(model folder, kind) for ``folder`` under the default choice: its ``unet/`` (or the
    folder itself) and ``raw`` / ``ema`` where the run's layout says which; None for a model
    folder that belongs to no recognisable run (it has one kind of weights only)."""
    if folder.name == EMA_FOLDER and _is_model(folder):
        return folder, "ema"
    if _is_model(folder / "unet"):
        model, owner = folder / "unet", folder
    elif folder.name == "unet" and _is_model(folder):
        model, owner = folder, folder.parent
    else:
        return folder, None
    if _is_model(owner / EMA_FOLDER):
        return model, "raw"  # an EMA run's checkpoint: unet/ beside unet_ema/
    if is_ema_run(owner):
        return model, "ema"  # an EMA run's output folder: unet/ holds the EMA weights
    return model, "raw" if _is_run(owner) else None


def model_folder(folder: Path, weights: str | None) -> tuple[Path, str | None]:
    """The model folder to load for checkpoint ``folder`` with ``weights`` ('raw', 'ema', or
    None: the folder's ``unet/`` as found, unchecked, for indexes built before the choice was
    recorded) and the kind it holds; ModelError when the folder holds the other kind only."""
    if weights is None:
        return weights_kind(folder)
    if weights not in WEIGHTS:
        raise ModelError(f"weights={weights!r}: use one of {', '.join(WEIGHTS)}")
    if weights == "ema" and _is_model(folder / EMA_FOLDER):
        return folder / EMA_FOLDER, "ema"
    model, kind = weights_kind(folder)
    if kind is None or kind == weights:
        return model, kind
    if weights == "ema" and _is_model(model.parent / EMA_FOLDER):
        raise ModelError(
            f"{folder}: the raw weights of an EMA checkpoint, but the others use EMA weights: "
            f"give {model.parent} (its {EMA_FOLDER}/ is taken) or build with weights='raw'"
        )
    if weights == "ema":
        raise ModelError(
            f"{folder}: raw weights only (no {EMA_FOLDER}/; the run was trained without "
            "--use_ema); build every checkpoint with weights='raw' (CLI --weights raw)"
        )
    if model.name == EMA_FOLDER:
        why = "holds EMA weights"
    else:
        why = (
            "is the final save of an EMA run (its checkpoint-<step>/ hold unet_ema/): its unet/ "
            "holds the EMA weights and the raw ones are saved only in the last checkpoint-<step>/"
        )
    raise ModelError(
        f"{folder}: {why}, but the other checkpoints use raw weights: one kind for every "
        "checkpoint; give checkpoint-<step> folders, or build with weights='ema' (CLI --weights ema)"
    )


def scheduler_folders(folder: Path) -> list[Path]:
    """Where a checkpoint's noise scheduler may be, nearest first: its own ``scheduler/``, its
    parent's (a checkpoint inside the run's output folder), and for a model folder inside a
    checkpoint (``checkpoint-<step>/unet``) the output folder's."""
    found = [folder / "scheduler", folder.parent / "scheduler"]
    if folder.name in ("unet", EMA_FOLDER):
        found.append(folder.parent.parent / "scheduler")
    return found
