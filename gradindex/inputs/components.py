"""Loading diffusers / transformers components from folders, safely.

A config file names the class to build (``_class_name``, ``architectures``); only a diffusers
model / scheduler class or a transformers model is accepted, so a config cannot make us build a
pipeline or call anything else. Also the weights fingerprints that tie an index to its models,
and what else decides their gradients: ``config_record`` (config.json, a LoRA adapter's
settings) and ``noise_schedule_digest`` (scheduler_config.json's ᾱ_t).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from gradindex.errors import ModelError


def read_config(path: Path) -> dict[str, Any]:
    """A component's JSON config as a dict; a damaged one (not UTF-8, not JSON, not an object)
    is a one-line ModelError naming the file, not a decoder traceback."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"{path}: not a valid JSON config ({str(exc).splitlines()[0]}); the checkpoint "
            "folder is damaged: save the model again with save_pretrained"
        ) from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: a config must be a JSON object, not {type(value).__name__}")
    return value


def load_model(model_dir: Path) -> torch.nn.Module:
    import diffusers

    cls_name = read_config(model_dir / "config.json").get("_class_name", "UNet2DModel")
    cls = diffusers_class(cls_name, diffusers.ModelMixin)
    if cls is None:
        raise ModelError(
            f"{model_dir}/config.json: _class_name {cls_name!r} is not a diffusers model class "
            "(a ModelMixin such as UNet2DModel); point at the model's folder, e.g. unet/"
        )
    safetensors = weights_format(model_dir)  # diffusers' own multi-line fetch text avoided
    try:
        model, info = cls.from_pretrained(
            model_dir,
            low_cpu_mem_usage=False,
            use_safetensors=safetensors,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{model_dir}: could not load the model ({_reason(exc)})") from None
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:  # diffusers would fill them with fresh initial values and say so only in a log
        names = ", ".join(str(m if isinstance(m, str) else m[0]) for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(
            f"{model_dir}: the weights file lacks {len(missing)} of the model's tensors "
            f"({names}{more}); it was saved from another architecture or is incomplete"
        )
    return model.eval()


def _reason(exc: BaseException) -> str:
    """One line from a loader's error: its first line, and the next one where the first only
    announces a list (torch's "Error(s) in loading state_dict for UNet2DModel:")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1]}"
    return first if len(first) <= 300 else first[:297] + "..."


def weights_format(folder: Path) -> bool:
    """``use_safetensors`` for a diffusers model folder: True with .safetensors weights; False
    with only pickled .bin ones (diffusers reads them with torch's weights_only, so no code in
    them runs), said in one warning; a folder without weights is a ModelError."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return True
    if any(n.endswith((".bin", ".bin.index.json")) for n in names):
        warnings.warn(
            f"{folder}: weights from a pickled .bin file, read as plain tensors only; "
            "save the model with save_pretrained to get .safetensors",
            UserWarning,
            stacklevel=3,
        )
        return False
    raise ModelError(
        f"{folder}: no weights (diffusion_pytorch_model.safetensors or .bin) beside its "
        "config.json; point at a folder the model was saved to with save_pretrained"
    )


def load_scheduler(path: Path) -> Any:
    import diffusers

    cfg_file = path / "scheduler_config.json"
    if not cfg_file.exists():
        raise ModelError(f"{path}: no scheduler_config.json")
    cls_name = read_config(cfg_file).get("_class_name", "DDPMScheduler")
    cls = diffusers_class(cls_name, diffusers.SchedulerMixin)
    if cls is None:
        if str(cls_name) in dir(diffusers):  # names something else of diffusers
            raise ModelError(
                f"{cfg_file}: _class_name {cls_name!r} is not a diffusers scheduler class"
            )
        cls = diffusers.DDPMScheduler  # a scheduler of a newer diffusers: DDPM reads its config
    return cls.from_pretrained(path)


def diffusers_class(name: Any, base: type) -> type | None:
    """The diffusers class called ``name`` if it is a subclass of ``base`` (``ModelMixin``,
    ``SchedulerMixin``), else None: a config file must not make us build a pipeline or call
    any other attribute of the diffusers module."""
    import diffusers

    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        cls = getattr(diffusers, name, None)
    except (ImportError, RuntimeError):  # lazy attributes whose extras are not installed
        return None
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def fingerprint_module(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def has_component(folder: Path, name: str) -> bool:
    if name == "tokenizer":
        return folder.is_dir() and any(
            (folder / f).exists() for f in ("tokenizer_config.json", "vocab.json", "tokenizer.json")
        )
    return (folder / "config.json").exists()


def load_component(folder: Path, name: str) -> Any:
    """A VAE (diffusers), text encoder or tokenizer (transformers) from its folder."""
    try:
        if name == "vae":
            import diffusers

            cls_name = read_config(folder / "config.json").get("_class_name", "AutoencoderKL")
            cls = diffusers_class(cls_name, diffusers.ModelMixin) or diffusers.AutoencoderKL
            return cls.from_pretrained(folder).eval()
        try:
            import transformers
        except ImportError:
            raise ModelError(
                "text-conditional models need transformers: pip install 'gradindex[text]'"
            ) from None
        if name == "tokenizer":
            return transformers.AutoTokenizer.from_pretrained(str(folder))
        arch = read_config(folder / "config.json").get("architectures") or ["CLIPTextModel"]
        cls = getattr(transformers, str(arch[0]), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            cls = transformers.CLIPTextModel  # a config names a model class, nothing else
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # keeps --json output clean
        try:
            return cls.from_pretrained(str(folder)).eval()
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{folder}: could not load the {name} ({str(exc).splitlines()[0]})"
        ) from None


def component_fingerprint(obj: Any) -> str:
    """Weights fingerprint of a module; a tokenizer's is its vocabulary and max length."""
    if isinstance(obj, torch.nn.Module):
        return fingerprint_module(obj)
    vocab = sorted(obj.get_vocab().items())
    text = json.dumps([vocab, int(obj.model_max_length)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# what besides the weights decides a checkpoint's gradients (recorded per checkpoint, checked)
_BOOKKEEPING = {"transformers_version", "torch_dtype", "dtype"}  # how it was saved or loaded
_LORA_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "rank_pattern",
              "alpha_pattern", "fan_in_fan_out", "bias", "layers_to_transform", "lora_bias")  # fmt: skip


def config_record(obj: Any) -> dict[str, Any]:
    """A model's / scheduler's / component's config as plain JSON values, without the
    bookkeeping of diffusers and transformers (version, source path, which values were
    defaults) and with a LoRA adapter's settings (rank, alpha...): what besides the weights
    decides its outputs, so an edited config.json is noticed. Equal for a module in memory and
    the folder it was saved to."""
    cfg = getattr(obj, "config", None)
    if hasattr(cfg, "to_dict"):  # transformers' PretrainedConfig
        items = cfg.to_dict()
    elif isinstance(cfg, dict):  # diffusers' FrozenDict
        items = dict(cfg)
    else:  # any other module: its config object's plain attributes, if it has one
        items = dict(vars(cfg)) if hasattr(cfg, "__dict__") else {}
    items = {
        k: v
        for k, v in items.items()
        if isinstance(k, str) and not k.startswith("_") and k not in _BOOKKEEPING and _plain(v)
    }
    items["class"] = type(obj).__name__
    peft = getattr(obj, "peft_config", None)
    if isinstance(peft, dict) and peft:
        items["peft"] = {
            name: {k: v for k, v in vars(c).items() if k in _LORA_KEYS and _plain(v)}
            for name, c in peft.items()
        }
    return json.loads(json.dumps(items, sort_keys=True, default=_set_as_list))


def noise_schedule_digest(scheduler: Any) -> str:
    """sha256 of what the loss takes from a scheduler: its ᾱ_t (``alphas_cumprod``, from the
    beta schedule), prediction type and number of training timesteps. Config keys used only for
    sampling (clip_sample, variance_type...) leave it unchanged."""
    cfg = scheduler.config
    h = hashlib.sha256(f"{cfg.get('prediction_type')}:{cfg.get('num_train_timesteps')}".encode())
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        h.update(torch.as_tensor(alphas).detach().double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _set_as_list(value: Any) -> list[str]:
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    raise TypeError(f"{type(value).__name__} is not a plain config value")


def _plain(value: Any) -> bool:
    """A value JSON holds as it is (sets as sorted lists): objects, whose text may hold a memory
    address, are left out, so a config reads the same in every process."""
    try:
        json.dumps(value, default=_set_as_list)
    except (TypeError, ValueError):
        return False
    return True


def checkpoint_config(model: torch.nn.Module, scheduler: Any) -> dict[str, Any]:
    """A checkpoint's record beside its weights fingerprint: the model's config (and LoRA
    settings), the scheduler's config, and the digest of the noise schedule the loss uses."""
    return {
        "model": config_record(model),
        "scheduler": config_record(scheduler),
        "noise_schedule": noise_schedule_digest(scheduler),
    }
