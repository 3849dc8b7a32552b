"""What a diffusers training run recorded about itself, and what a build takes from it.

diffusers' example trainers log through accelerate's TensorBoard tracker: ``init_trackers(
project, config=vars(args))`` writes the script's arguments as TensorBoard hparams under
``OUTPUT/<logging_dir>/<project>/``, and ``accelerator.log({"lr": ...}, step=global_step)``
(train_unconditional.py) one learning rate per optimizer step. Each ``checkpoint-<step>/``
of ``accelerator.save_state`` also keeps the learning-rate scheduler's state
(``scheduler.bin``) and the optimizer's (``optimizer.bin``).

Holds:
- ``run_folder(source)``: the run's output folder of a checkpoint path; ``checkpoint_step``.
- ``read_run(folder)``: the run's ``RunRecord`` (hparams, logged learning rates, project
  names) from its event files, or None when it kept none; reading needs ``tensorboard``.
- ``spec_from_run(spec, record, prediction_type)``: the spec with the loss settings the run
  recorded filled in where the spec left them at their defaults, and what was taken from where.
- ``auto_weights(sources, record)``: ``checkpoint_weights='auto'``, TracIn's learning-rate
  sums between checkpoints: exact from logged learning rates, else an approximation from each
  checkpoint's scheduler state and step.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradindex.errors import ModelError, SpecError
from gradindex.spec import BuildSpec

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
EVENTS_PREFIX = "events.out.tfevents."
MAX_DEPTH = 4  # OUTPUT/logs/<project>/<time>/events...
UNCONDITIONAL_PROJECT = "train_unconditional"  # its init_trackers name: the script's file name


@dataclass
class RunRecord:
    """A run's TensorBoard records: ``hparams`` (the logged arguments, None values left out
    by TensorBoard, booleans as 0 / 1), ``lrs`` (step → logged 'lr'), the tracker projects."""

    folder: Path
    files: list[Path]
    hparams: dict[str, Any] = field(default_factory=dict)
    lrs: dict[int, float] = field(default_factory=dict)
    projects: list[str] = field(default_factory=list)


def run_folder(source: str) -> Path | None:
    """The output folder of the run a checkpoint path belongs to: the parent of
    ``checkpoint-<step>`` (or of ``checkpoint-<step>/unet``), the pipeline folder of
    ``OUTPUT/unet``, else the folder itself; None for what is not a folder."""
    path = Path(source)
    if not path.is_dir():
        return None
    path = path.resolve()
    if CHECKPOINT_DIR.match(path.name):
        return path.parent
    if CHECKPOINT_DIR.match(path.parent.name):
        return path.parent.parent
    if (path.parent / "model_index.json").is_file():
        return path.parent
    return path


def checkpoint_step(source: str) -> int | None:
    """The optimizer step of a ``checkpoint-<step>`` folder (or a folder inside one)."""
    path = Path(source).resolve()
    for part in (path.name, path.parent.name):
        found = CHECKPOINT_DIR.match(part)
        if found:
            return int(found.group(1))
    return None


def event_files(folder: Path) -> list[Path]:
    """TensorBoard event files under ``folder`` (at most MAX_DEPTH levels down, not inside
    ``checkpoint-*`` folders), in name order."""
    found = []
    for root, dirs, files in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = [] if depth >= MAX_DEPTH else [d for d in dirs if not CHECKPOINT_DIR.match(d)]
        found += [Path(root) / f for f in files if f.startswith(EVENTS_PREFIX)]
    return sorted(found)


def read_run(folder: Path) -> RunRecord | None:
    """The records under a run's output folder, or None when it holds no event files.
    Later events win where two files log the same step (a resumed run)."""
    files = event_files(folder)
    if not files:
        return None
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.plugins.hparams import plugin_data_pb2
        from tensorboard.util import tensor_util
    except ImportError:
        raise ModelError(
            f"{folder} keeps TensorBoard records of its training; reading them needs "
            "tensorboard: pip install tensorboard"
        ) from None
    record = RunRecord(folder, files)
    events: list[tuple[float, int, str, Any]] = []  # (wall time, step, 'lr' / 'hparams', value)
    for path in files:
        try:
            for event in EventFileLoader(str(path)).Load():
                for v in event.summary.value:
                    if v.metadata.plugin_data.plugin_name == "hparams":
                        data = plugin_data_pb2.HParamsPluginData.FromString(
                            v.metadata.plugin_data.content
                        )
                        hp = data.session_start_info.hparams
                        events += [(event.wall_time, 0, "hparams", dict(hp.items()))]
                    elif v.tag == "lr":
                        lr = float(tensor_util.make_ndarray(v.tensor))
                        events.append((event.wall_time, int(event.step), "lr", lr))
        except Exception as exc:  # noqa: BLE001 - a damaged file of any kind: one line
            raise ModelError(f"{path}: not a readable TensorBoard event file ({exc})") from None
        project = path.relative_to(folder).parts
        if len(project) >= 3:  # <logging_dir>/<project>/...
            record.projects.append(project[1])
    for _, step, kind, value in sorted(events, key=lambda e: e[0]):
        if kind == "lr":
            record.lrs[step] = value
            continue
        for name, v in value.items():
            which = v.WhichOneof("kind")
            if which in ("number_value", "string_value", "bool_value"):
                record.hparams[name] = getattr(v, which)
    record.projects = sorted(set(record.projects))
    return record


# -- the loss the run trained ---------------------------------------------------------------


def spec_from_run(
    spec: BuildSpec, record: RunRecord, prediction_type: str
) -> tuple[BuildSpec, dict[str, str]]:
    """Fill the loss settings the run recorded where ``spec`` has its defaults; returns the
    spec and {field: where its value came from}. A spec value that disagrees with the record
    is kept, with a warning naming both."""
    recorded = _recorded_loss(record, prediction_type)
    defaults = BuildSpec()
    changes, taken = {}, {}
    for name, (value, origin) in recorded.items():
        mine = getattr(spec, name)
        if mine == value:
            continue
        if mine == getattr(defaults, name):
            changes[name], taken[name] = value, origin
        else:
            warnings.warn(
                f"BuildSpec.{name}={mine!r} but the run recorded {value!r} ({origin}); "
                f"building with {mine!r}",
                stacklevel=3,
            )
    if "snr_gamma" in changes and "snr_weighting" not in changes and spec.snr_weighting != "none":
        del changes["snr_gamma"], taken["snr_gamma"]  # the user chose another weighting
    if taken:
        spec = spec.replace(**changes)
        for name, origin in taken.items():
            logger.info("%s=%r taken from %s", name, changes[name], origin)
    return spec, taken


def _recorded_loss(record: RunRecord, prediction_type: str) -> dict[str, tuple[Any, str]]:
    """{spec field: (value, where it came from)} of the loss settings in the run's records."""
    hp, out = record.hparams, {}
    where = f"the hparams logged under {record.folder}"
    if isinstance(hp.get("snr_gamma"), float) and hp["snr_gamma"] > 0:
        out["snr_weighting"] = ("min_snr", f"snr_gamma in {where}")
        out["snr_gamma"] = (hp["snr_gamma"], where)
    for name in ("noise_offset", "input_perturbation"):
        if isinstance(hp.get(name), float):
            out[name] = (hp[name], where)
    run_type = hp.get("prediction_type")
    if isinstance(run_type, str) and run_type != prediction_type:
        warnings.warn(
            f"the run trained with prediction_type {run_type!r} ({where}) but the checkpoints' "
            f"scheduler predicts {prediction_type!r}; pass --scheduler with a "
            f"scheduler_config.json of prediction_type {run_type!r}",
            stacklevel=3,
        )
    if UNCONDITIONAL_PROJECT in record.projects and prediction_type == "sample":
        out["snr_weighting"] = (
            "snr",
            f"{UNCONDITIONAL_PROJECT}'s TensorBoard project under {record.folder} (that script "
            "weights sample prediction by snr(t))",
        )
    return out


# -- checkpoint weights ---------------------------------------------------------------------


def auto_weights(sources: list[str], record: RunRecord | None) -> tuple[list[float], dict]:
    """TracIn's w_c = Σ of the learning rates of the optimizer steps in (s_{c-1}, s_c]
    (s_0 = 0), each step's rate as the scripts log it (after that step's scheduler step), and a
    record of how they were found: the logged 'lr' of every step; else the schedule the logged
    arguments name, when it reproduces every rate a checkpoint saved; else an approximation
    from each ``checkpoint-<step>/scheduler.bin``: s_1·η_1, then
    (s_c − s_{c-1})·(η_{c-1} + η_c)/2."""
    steps = _steps(sources, record)
    last = steps[-1]
    if record is not None and all(g in record.lrs for g in range(1, last + 1)):
        rates = [0.0] + [record.lrs[g] for g in range(1, last + 1)]
        method = f"exact: the learning rates logged at every step under {record.folder}"
    else:
        rates, method = _schedule_rates(sources, steps, record)
    if rates is not None:
        bounds = [0, *steps]
        weights = [math.fsum(rates[a + 1 : b + 1]) for a, b in zip(bounds, steps)]
    else:
        etas = _checkpoint_rates(sources, steps)
        weights = [steps[0] * etas[0]] + [
            (s - p) * (a + b) / 2 for s, p, a, b in zip(steps[1:], steps, etas, etas[1:])
        ]
        method = f"approximation ({method}): each checkpoint's learning rate x steps, trapezoid"
    for source, w, a, b in zip(sources, weights, [0, *steps], steps):
        if not w > 0:
            raise SpecError(
                f"checkpoint_weights='auto': {source} gets weight {w:g}: the learning rates of "
                f"steps {a + 1}..{b} sum to 0 (a schedule ending at 0 logs 0 after its last "
                "step; or the folder repeats the checkpoint before); leave it out, or give "
                "--checkpoint-weights"
            )
    return weights, {"method": method, "steps": steps, "weights": weights}


SCHEDULE_ARGS = ("lr_scheduler", "learning_rate", "lr_warmup_steps", "max_train_steps")


def _schedule_rates(
    sources: list[str], steps: list[int], record: RunRecord | None
) -> tuple[list[float] | None, str]:
    """The rate after each step 0..s_C of the schedule the run's logged arguments name
    (diffusers' ``get_scheduler``, as the scripts call it), checked against every rate a
    checkpoint saved; or None and why not."""
    hp = record.hparams if record is not None else {}
    if not all(k in hp for k in SCHEDULE_ARGS):
        gaps = record is not None and record.lrs
        return None, "logged lr has missing steps" if gaps else "no learning rate logged"
    from diffusers.optimization import get_scheduler

    base = float(hp["learning_rate"])
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=base)
    extra = {k: hp[f"lr_{k}"] for k in ("num_cycles", "power") if f"lr_{k}" in hp}
    extra = {k: int(v) if k == "num_cycles" else float(v) for k, v in extra.items()}
    try:
        sched = get_scheduler(
            str(hp["lr_scheduler"]), optimizer, num_warmup_steps=int(hp["lr_warmup_steps"]),
            num_training_steps=int(hp["max_train_steps"]), **extra,
        )  # fmt: skip
        lam = sched.lr_lambdas[0]
        rates = [base * float(lam(g)) for g in range(steps[-1] + 1)]
    except Exception:  # noqa: BLE001 - a schedule get_scheduler cannot rebuild from these
        return None, f"the logged lr_scheduler {hp['lr_scheduler']!r} cannot be rebuilt"
    checked = 0
    for source, step in zip(sources, steps):
        saved = _saved_rate(Path(source))
        if saved is not None:
            if not math.isclose(saved, rates[step], rel_tol=1e-6, abs_tol=1e-15):
                return (
                    None,
                    f"the logged schedule gives {rates[step]:g} at step {step}, not {saved:g}",
                )
            checked += 1
    warmup, total = int(hp["lr_warmup_steps"]), int(hp["max_train_steps"])
    how = f"{hp['lr_scheduler']}, warm-up {warmup} of {total} steps"
    check = f"equal to the rate saved in {checked} checkpoint(s)" if checked else "not checked"
    return rates, f"the schedule in the arguments logged under {record.folder} ({how}; {check})"


def _steps(sources: list[str], record: RunRecord | None) -> list[int]:
    """Each checkpoint's optimizer step: from its ``checkpoint-<step>`` name, or for the run's
    final folder the last logged step (else the logged max_train_steps). Training order."""
    steps = []
    for source in sources:
        step = checkpoint_step(source)
        if step is None and record is not None:
            step = max(record.lrs) if record.lrs else record.hparams.get("max_train_steps")
        if step is None:
            raise SpecError(
                f"checkpoint_weights='auto': cannot tell at which step {source} was saved (not "
                "a checkpoint-<step> folder, and its run logged no steps); give the weights"
            )
        steps.append(int(step))
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] <= 0:
        raise SpecError(
            f"checkpoint_weights='auto': the checkpoints' steps {steps} are not increasing; "
            "give the checkpoints in training order, each once"
        )
    return steps


def _checkpoint_rates(sources: list[str], steps: list[int]) -> list[float]:
    """η_c: the learning rate in each checkpoint's scheduler.bin (else optimizer.bin); a final
    folder with neither takes the checkpoint before it's."""
    etas: list[float] = []
    for source in sources:
        eta = _saved_rate(Path(source))
        if eta is None and etas:
            eta = etas[-1]
        if eta is None:
            raise SpecError(
                f"checkpoint_weights='auto': {source} has no logged learning rates and no "
                "scheduler.bin / optimizer.bin (accelerate save_state); give the weights"
            )
        etas.append(eta)
    return etas


def _saved_rate(folder: Path) -> float | None:
    """The learning rate of the next step as accelerate saved it in ``folder`` (or its parent
    ``checkpoint-<step>`` for ``.../unet``): the scheduler's ``_last_lr``, the optimizer's
    ``param_groups[0]['lr']``."""
    folder = folder.resolve()
    for base in (folder, folder.parent):
        if base != folder and not CHECKPOINT_DIR.match(base.name):
            break
        for name, read in (("scheduler.bin", _scheduler_lr), ("optimizer.bin", _optimizer_lr)):
            if (base / name).is_file():
                try:
                    state = torch.load(base / name, map_location="cpu", weights_only=True)
                    return float(read(state))
                except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
                    raise ModelError(f"{base / name}: no learning rate in it ({exc})") from None
    return None


def _scheduler_lr(state: dict) -> float:
    return state["_last_lr"][0]


def _optimizer_lr(state: dict) -> float:
    return state["param_groups"][0]["lr"]


# -- what a build calls ---------------------------------------------------------------------


def resolve_from_run(
    spec: BuildSpec, ckpts: list[Any], read_records: bool = True
) -> tuple[BuildSpec, dict[str, Any] | None]:
    """The spec a build uses: loss settings the checkpoints' run recorded filled in (unless
    ``read_records`` is False), ``checkpoint_weights='auto'`` resolved; and the manifest's
    record of what came from where (None when nothing did). Warns when the scheduler's
    prediction type implies a weighting the spec lacks."""
    sources = [c.source for c in ckpts]
    folder = next((f for f in map(run_folder, sources) if f is not None), None)
    auto = spec.checkpoint_weights == "auto"
    if auto and folder is None:
        raise SpecError(
            "checkpoint_weights='auto' reads the run's records: give checkpoint folders "
            "(checkpoint-<step>/ of the training run), not models in memory"
        )
    record = _run_record(folder, auto) if folder is not None and (auto or read_records) else None
    out: dict[str, Any] = {"folder": str(folder)} if record is not None or auto else {}
    if record is not None:
        out["event_files"] = [str(f) for f in record.files]
        if read_records:
            spec, out["taken"] = spec_from_run(spec, record, ckpts[0].prediction_type)
    if auto:
        weights, out["checkpoint_weights"] = auto_weights(sources, record)
        spec = spec.replace(checkpoint_weights=tuple(weights))
        logger.info("checkpoint weights %s: %s", weights, out["checkpoint_weights"]["method"])
    if ckpts[0].prediction_type == "sample" and spec.snr_weighting == "none":
        warnings.warn(
            "the scheduler predicts 'sample', which diffusers' train_unconditional.py trains "
            "weighted by snr(t); if this run did, build with --snr-weighting snr "
            "(BuildSpec(snr_weighting='snr'))",
            stacklevel=2,
        )
    return spec, out or None


def _run_record(folder: Path, needed: bool) -> RunRecord | None:
    """``read_run(folder)``; without tensorboard installed, an error only when ``needed``
    (checkpoint_weights='auto'), else a warning that its loss settings were not read."""
    if not needed and importlib.util.find_spec("tensorboard") is None:
        if event_files(folder):
            warnings.warn(
                f"{folder} keeps TensorBoard records of its training, not read: pip install "
                "tensorboard to take its loss settings from them",
                stacklevel=3,
            )
        return None
    return read_run(folder)
