"""The options several ``gradindex`` commands share, defined once.

The BuildSpec options are generated from its fields (their help is the spec's own field docs)
and parsed back into a ``BuildSpec`` here; the ``--data`` reading options, ``--scheduler``,
``--device``, ``--base-model`` and the moved-checkpoints ``--checkpoint`` are decorators the
commands stack.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from gradindex.errors import GradIndexError
from gradindex.spec import CHOICES, BuildSpec

# -- spec options generated from BuildSpec fields, so its docs are the CLI's help -----------

_FLOATS = ("snr_gamma", "noise_offset", "input_perturbation")
_SKIP = {"num_train_timesteps"}


def conditioning_options(func: Any) -> Any:
    """--base-model: where a latent or text-to-image model's other components are."""
    return click.option(
        "--base-model",
        default=None,
        type=click.Path(exists=True, file_okay=False),
        help="Stable-Diffusion-layout folder with vae/, text_encoder/, tokenizer/ (and unet/ "
        "for LoRA checkpoints), when the checkpoint folders and their parent hold none.",
    )(func)


_DATA_OPTIONS = {  # how --data is read (gradindex.inputs.training_data.open_source's keywords)
    "image_column": "Image column of a Hugging Face dataset / parquet --data (default: the "
    "first of image, img, pixel_values).",
    "caption_column": "Caption column of a dataset --data (default: text, caption, ...).",
    "label_column": "Class-label column of a dataset --data (default: label, labels, ...).",
    "id_column": "Id column of a dataset --data (default: the row number).",
    "split": "Split of a saved DatasetDict --data (default: train).",
}


def data_options(func: Any) -> Any:
    """--image-column ... --split and --on-error: collected by ``data_kwargs``."""
    func = click.option(
        "--on-error",
        type=click.Choice(["raise", "skip"]),
        default="raise",
        show_default=True,
        help="A corrupt image or truncated tar member in --data: stop naming it (raise), or "
        "leave it out and list it (skip; every sample is decoded once up front).",
    )(func)
    for name, help_text in reversed(_DATA_OPTIONS.items()):
        func = click.option("--" + name.replace("_", "-"), name, default=None, help=help_text)(func)
    return func


def data_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Pop the --data reading options from a command's keyword arguments (given ones only)."""
    given = {k: options.pop(k) for k in (*_DATA_OPTIONS, "on_error")}
    return {k: v for k, v in given.items() if v is not None and (k, v) != ("on_error", "raise")}


# options shared by the commands that featurize (build, add)
scheduler_option = click.option(
    "--scheduler",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Noise-scheduler folder; when given it is used instead of the run's own scheduler/ "
    "(found beside the checkpoint or in the run's output folder).",
)
device_option = click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="torch device for gradients: cpu, cuda, cuda:N, or auto (a GPU when there is one).",
)


def spec_options(func: Any) -> Any:
    """One option per BuildSpec field, its help the field's own doc; all default to None, so
    ``spec_from_options`` can tell what was given from what --config or the spec fills."""
    for f in reversed(dataclasses.fields(BuildSpec)):
        if f.name in _SKIP:
            continue
        name = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name in CHOICES:
            opt = click.option(
                name, type=click.Choice(CHOICES[f.name]), default=None, help=help_text
            )
        elif f.name in ("timesteps", "checkpoint_weights"):
            opt = click.option(name, type=str, default=None, help=help_text + " Comma-separated.")
        elif f.name == "params":
            opt = click.option(name, type=str, multiple=True, help=help_text + " Repeatable.")
        elif f.name == "data_range":
            opt = click.option(name, type=(float, float), default=None, help=help_text)
        elif f.name in _FLOATS:
            alone = " Given alone: --snr-weighting min_snr." if f.name == "snr_gamma" else ""
            opt = click.option(name, type=float, default=None, help=help_text + alone)
        elif f.name == "center_crop":
            opt = click.option(name, is_flag=True, default=None, help=help_text)
        else:
            opt = click.option(name, type=int, default=None, help=help_text)
        func = opt(func)
    return func


def _read_config(config: str) -> dict[str, Any]:
    """The BuildSpec fields of a --config JSON file; any problem with it names the file."""
    from gradindex.errors import SpecError

    try:
        text = Path(config).read_text()
        return BuildSpec.from_json(text).to_dict()
    except UnicodeDecodeError:
        raise SpecError(f"--config {config}: not a text (JSON) file") from None
    except TypeError as exc:  # a value of the wrong kind: name its field
        fields = json.loads(text)
        bad = [k for k in fields if _type_error(k, fields[k])] or ["?"]
        raise SpecError(f"--config {config}: field {bad[0]!r} has the wrong type ({exc})") from None
    except (GradIndexError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"--config {config}: {first}") from None


def _type_error(name: str, value: Any) -> bool:
    try:
        BuildSpec.from_dict({name: value})
    except TypeError:
        return True
    except (GradIndexError, ValueError):
        pass
    return False


def spec_from_options(config: str | None, options: dict[str, Any]) -> BuildSpec:
    """The spec: --config's fields, overridden by the options given (popped from ``options``)."""
    base = _read_config(config) if config else {}
    for f in dataclasses.fields(BuildSpec):
        value = options.pop(f.name, None)
        if value is None or value == ():
            continue
        if f.name == "timesteps":
            parts = [p for p in value.split(",") if p.strip()]
            value = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
        elif f.name == "checkpoint_weights":
            value = "auto" if value.strip() == "auto" else _numbers(value, "--checkpoint-weights")
        elif f.name == "params":
            value = list(value)
        base[f.name] = value
    if base.get("snr_gamma") is not None and base.get("snr_weighting", "none") == "none":
        base["snr_weighting"] = "min_snr"  # --snr-gamma alone: the scripts' min-SNR weighting
    return BuildSpec.from_dict(base)


def _numbers(text: str, option: str) -> list[float]:
    """Comma-separated numbers of an option, or a SpecError naming it."""
    from gradindex.errors import SpecError

    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SpecError(f"{option} {text!r}: give comma-separated numbers or 'auto'") from None


moved_checkpoints = click.option(
    "--checkpoint",
    "-c",
    "checkpoints",
    multiple=True,
    help="The index's checkpoint folders, when they moved since the build: once per "
    "checkpoint, in build order (each is checked against the fingerprint the index recorded).",
)
