"""Conditioning that travels with the images: class labels, text prompts, and VAE latents.

Holds:
- ``conditioning_kind(model)``: "none", "class" (a ``UNet2DModel`` with ``num_class_embeds``)
  or "text" (a ``UNet2DConditionModel``, cross-attending to a text encoder's hidden states).
- ``load_conditioning(source, ids, n, kind, labels=, prompts=)``: per-row labels / captions of a
  data set — given as arguments, as ``labels`` / ``captions`` arrays of an ``.npz``, as class
  sub-folders of an image folder, or as ``metadata.jsonl`` (``file_name``, ``text``: the
  layout diffusers' text_to_image example reads).
- ``Conditioner``: for one index, turns labels / prompts into the UNet's keyword arguments
  (``class_labels`` [B]; ``encoder_hidden_states`` [B, L, E], each prompt encoded once by the
  frozen text encoder and cached) and pixel images into scaled VAE latents (the latent
  distribution's mean, or one seeded sample with the same noise for every image, so a training
  image re-encoded at query time gets its stored latent). The text encoder, tokenizer and VAE
  come from a Stable-Diffusion-layout folder (``vae/``, ``text_encoder/``, ``tokenizer/``).

Gradients are taken over the UNet only: the VAE and text encoder run under ``no_grad``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.data import array_file_errors
from gradindex.errors import DataError, ModelError
from gradindex.models import Checkpoint, diffusers_class, fingerprint_module

logger = logging.getLogger(__name__)

KINDS = ("none", "class", "text")
COMPONENTS = ("vae", "text_encoder", "tokenizer")
PROMPT_CACHE = 4096  # encoded prompts kept in memory ([L, E] each)


def conditioning_kind(model: torch.nn.Module) -> str:
    """What a UNet is conditioned on, from its diffusers config."""
    cfg = getattr(model, "config", None)
    num_classes = getattr(cfg, "num_class_embeds", None) if cfg is not None else None
    class_type = getattr(cfg, "class_embed_type", None) if cfg is not None else None
    if type(model).__name__ == "UNet2DConditionModel":
        if num_classes is not None or class_type is not None:
            raise ModelError(
                "a UNet2DConditionModel with class embeddings is not supported: use text or "
                "class conditioning, not both"
            )
        return "text"
    if class_type is not None:
        raise ModelError(
            f"class_embed_type={class_type!r} is not supported; class-conditional models need "
            "num_class_embeds (a label lookup table)"
        )
    return "class" if num_classes is not None else "none"


@dataclass
class ConditioningData:
    """Per-row conditioning of a data set (training rows or a query batch)."""

    labels: np.ndarray | None = None  # [N] int64
    prompts: list[str] | None = None  # N captions
    class_names: list[str] | None = None  # label → class sub-folder name

    def rows(self, start: int, stop: int) -> ConditioningData:
        return ConditioningData(
            None if self.labels is None else self.labels[start:stop],
            None if self.prompts is None else self.prompts[start:stop],
            self.class_names,
        )

    def digest(self) -> str | None:
        """sha256 of the labels and prompts: a resumed build must see the same ones."""
        if self.labels is None and self.prompts is None:
            return None
        h = hashlib.sha256()
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        if self.prompts is not None:
            h.update(json.dumps(self.prompts).encode())
        return h.hexdigest()[:16]


def load_conditioning(
    source: Any,
    ids: np.ndarray,
    n: int,
    kind: str,
    labels: Any = None,
    prompts: Any = None,
    required: bool = True,
) -> ConditioningData:
    """The labels / captions of the ``n`` rows of ``source`` (ids as ``load_images`` gave them),
    for a model of conditioning ``kind``. Arguments win over what the data source holds; with
    ``required=False``, a source that holds none gives empty data instead of an error."""
    if kind == "none":
        if labels is not None or prompts is not None:
            raise DataError(
                "the model is unconditional but labels or prompts were given; drop them"
            )
        return ConditioningData()
    if kind == "class":
        if prompts is not None:
            raise DataError("the model is class-conditional: give labels, not prompts")
        class_names = None
        if labels is None:
            labels = _npz_array(source, ("labels",))
        if labels is None:
            labels, class_names = _folder_classes(source, ids)
        if labels is None and not required:
            return ConditioningData()
        if labels is None:
            raise DataError(
                "the model is class-conditional but no labels were found: pass labels=[...] "
                "(CLI --labels FILE), an .npz with a 'labels' array, or a folder of class "
                "sub-folders"
            )
        return ConditioningData(labels=as_labels(labels, n), class_names=class_names)
    if kind == "text":
        if labels is not None:
            raise DataError("the model is text-conditional: give prompts, not labels")
        if prompts is None:
            arr = _npz_array(source, ("captions", "text"))
            prompts = None if arr is None else arr.tolist()
        if prompts is None:
            prompts = _folder_captions(source, ids)
        if prompts is None and not required:
            return ConditioningData()
        if prompts is None:
            raise DataError(
                "the model is text-conditional but no captions were found: pass prompts=[...] "
                "(CLI --prompts FILE), an .npz with a 'captions' array, or an image folder with "
                "a metadata.jsonl of file_name / text"
            )
        return ConditioningData(prompts=as_prompts(prompts, n))
    raise ModelError(f"unknown conditioning kind {kind!r}")


def as_labels(labels: Any, n: int) -> np.ndarray:
    """Validate labels: one integer per row (a single integer is repeated for every row)."""
    arr = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"labels have shape {arr.shape} but there are {n} images; one per image")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise DataError(f"labels have dtype {arr.dtype}; class labels must be integers")
    return arr.astype(np.int64)


def as_prompts(prompts: Any, n: int) -> list[str]:
    """Validate prompts: one string per row (a single string is repeated for every row)."""
    if isinstance(prompts, str):
        prompts = [prompts] * n
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise DataError("prompts must be a list of strings, one per image")
    if len(prompts) != n:
        raise DataError(f"{len(prompts)} prompts for {n} images; give one prompt per image")
    return list(prompts)


def _npz_array(source: Any, keys: tuple[str, ...]) -> np.ndarray | None:
    if not isinstance(source, (str, os.PathLike)) or Path(source).suffix != ".npz":
        return None
    with array_file_errors(Path(source)), np.load(source, allow_pickle=False) as z:
        for key in keys:
            if key in z:
                return z[key]
    return None


def _folder_classes(source: Any, ids: np.ndarray) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from class sub-folders (``root/<class>/<image>``), classes in sorted name order
    as torchvision's ImageFolder numbers them."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None, None
    parts = [Path(str(i)).parts for i in ids]
    if any(len(p) < 2 for p in parts):
        raise DataError(
            f"{source}: some images are not in a class sub-folder; put every image in "
            "<folder>/<class>/ or pass labels explicitly"
        )
    names = sorted({p[0] for p in parts})
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[p[0]] for p in parts], dtype=np.int64), names


def _folder_captions(source: Any, ids: np.ndarray) -> list[str] | None:
    """Captions from every ``metadata.jsonl`` under an image folder (``file_name`` relative to
    the metadata file's folder, ``text`` the caption)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return None
    root = Path(source)
    files = sorted(root.rglob("metadata.jsonl"))
    if not files:
        return None
    captions: dict[str, str] = {}
    for meta in files:
        for lineno, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name, text = rec["file_name"], rec["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{meta}:{lineno}: each line must be a JSON object with file_name and text"
                ) from None
            if not isinstance(text, str):
                raise DataError(f"{meta}:{lineno}: text must be a string")
            captions[str((meta.parent / name).relative_to(root))] = text
    missing = [str(i) for i in ids if str(i) not in captions]
    if missing:
        raise DataError(
            f"{root}: {len(missing)} image(s) have no caption in metadata.jsonl (first: "
            f"{missing[0]}); add them or drop the images"
        )
    return [captions[str(i)] for i in ids]


def latent_noise_seed(seed: int) -> int:
    """Seed of the one VAE noise draw shared by every image (spec.latents='sample')."""
    return int(np.random.SeedSequence([int(seed), 0x5EED1A7]).generate_state(1)[0])


class Conditioner:
    """Labels / prompts → UNet keyword arguments, pixel images → latents, for one index."""

    def __init__(
        self,
        kind: str,
        *,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        components: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
        latents: str = "mean",
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        self.kind = kind
        self.num_classes = num_classes
        self.class_names = class_names
        self.device = torch.device(device)
        comps = dict(components or {})
        self.vae = comps.get("vae")
        self.text_encoder = comps.get("text_encoder")
        self.tokenizer = comps.get("tokenizer")
        self.sources = dict(sources or {})
        self.latents = latents
        self.seed = seed
        if self.vae is not None:
            self.vae = self.vae.to(self.device).eval()
        if self.text_encoder is not None:
            self.text_encoder = self.text_encoder.to(self.device).eval()
        if kind == "text" and (self.text_encoder is None or self.tokenizer is None):
            raise ModelError(
                "a text-conditional UNet needs text_encoder/ and tokenizer/: pass the "
                "Stable-Diffusion-layout folder that holds them (base_model=..., CLI --base-model)"
            )
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- construction -------------------------------------------------------------------

    @classmethod
    def for_checkpoints(
        cls,
        checkpoints: list[Checkpoint],
        base_model: Any = None,
        latents: str = "mean",
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> Conditioner:
        """The conditioner of a build: kind from the first UNet, components from ``base_model``
        (a folder or a mapping of component objects), else the first checkpoint's folder or its
        parent (the layout of diffusers' training scripts)."""
        kinds = {conditioning_kind(c.model) for c in checkpoints}
        if len(kinds) > 1:
            raise ModelError(f"checkpoints differ in conditioning ({sorted(kinds)})")
        kind = kinds.pop()
        num_classes = None
        if kind == "class":
            counts = {int(c.model.config.num_class_embeds) for c in checkpoints}
            if len(counts) > 1:
                raise ModelError(f"checkpoints differ in num_class_embeds ({sorted(counts)})")
            num_classes = counts.pop()
        wanted = COMPONENTS if kind == "text" else ("vae",)  # a pixel model may still be latent
        components: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if isinstance(base_model, Mapping):
            components = {k: base_model[k] for k in wanted if base_model.get(k) is not None}
            sources = {k: "memory" for k in components}
        else:
            folders = [Path(base_model)] if base_model is not None else []
            if base_model is not None and not folders[0].is_dir():
                raise ModelError(f"{base_model}: no such base model folder")
            if base_model is None and not checkpoints[0].source.startswith("memory:"):
                first = Path(checkpoints[0].source)
                folders = [first, first.parent]
            for name in wanted:
                found = next((f / name for f in folders if _has_component(f / name, name)), None)
                if found is not None:
                    components[name] = load_component(found, name)
                    sources[name] = str(found.resolve())
        if kind == "text" and "vae" not in components:
            logger.warning("no vae/ found: the text-conditional UNet is taken to run on pixels")
        return cls(
            kind,
            num_classes=num_classes,
            components=components,
            sources=sources,
            latents=latents,
            seed=seed,
            device=device,
        )

    @classmethod
    def from_record(
        cls,
        record: Mapping[str, Any] | None,
        base_model: Any = None,
        device: str | torch.device = "cpu",
    ) -> Conditioner:
        """The query-side conditioner of an index, from its manifest record; components are
        reloaded from their recorded folders (or ``base_model``) and their fingerprints
        checked against the ones the index was built with."""
        if not record:
            return cls("none", device=device)
        recorded = record.get("components", {})
        components: dict[str, Any] = {}
        if isinstance(base_model, Mapping):
            components = {k: base_model[k] for k in recorded if base_model.get(k) is not None}
        for name, rec in recorded.items():
            if name in components:
                continue
            folder = Path(base_model) / name if base_model is not None else Path(rec["source"])
            if rec["source"] == "memory" and base_model is None:
                raise ModelError(
                    "this index was built with in-memory conditioning components: pass them "
                    "with AttributionIndex.open(path, base_model={...})"
                )
            if not _has_component(folder, name):
                raise ModelError(f"{folder}: the index's {name} is missing; pass base_model=DIR")
            components[name] = load_component(folder, name)
        for name, obj in components.items():
            want = recorded[name]["fingerprint"]
            if component_fingerprint(obj) != want:
                raise ModelError(
                    f"the {name} differs from the one the index was built with "
                    f"(fingerprint {component_fingerprint(obj)} vs {want}); rebuild the index"
                )
        return cls(
            record["kind"],
            num_classes=record.get("num_classes"),
            class_names=record.get("class_names"),
            components=components,
            sources={k: v["source"] for k, v in recorded.items()},
            latents=record.get("latents", "mean"),
            seed=int(record.get("seed", 0)),
            device=device,
        )

    def record(self, data: ConditioningData | None = None) -> dict[str, Any]:
        """What the manifest keeps to reproduce the conditioning at query time."""
        rec: dict[str, Any] = {"kind": self.kind, "latent": self.vae is not None}
        if self.kind == "class":
            rec["num_classes"] = self.num_classes
            rec["class_names"] = data.class_names if data is not None else self.class_names
        if self.vae is not None:
            rec.update(latents=self.latents, seed=self.seed, scaling_factor=self.scaling_factor)
        if self.tokenizer is not None:
            rec["max_length"] = int(self.tokenizer.model_max_length)
        comps = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        rec["components"] = {
            name: {
                "source": self.sources.get(name, "memory"),
                "fingerprint": component_fingerprint(obj),
            }
            for name, obj in comps.items()
            if obj is not None
        }
        return rec

    # -- shapes and images --------------------------------------------------------------

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0)) if self.vae else 1.0

    def image_shape(self, sample_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) the images are prepared at: the UNet's sample shape, or for a latent model
        the VAE's input channels at the latent size × the VAE's downsampling factor."""
        c, h, w = (int(v) for v in sample_shape)
        if self.vae is None:
            return (c, h, w)
        cfg = self.vae.config
        if int(cfg.latent_channels) != c:
            raise ModelError(
                f"the VAE makes {cfg.latent_channels}-channel latents but the UNet takes {c}"
            )
        f = 2 ** (len(cfg.block_out_channels) - 1)
        return (int(cfg.in_channels), h * f, w * f)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] → the UNet's x0: scaled VAE latents [B, c, h, w] (the
        images themselves when there is no VAE)."""
        if self.vae is None:
            return x
        dist = self.vae.encode(x.to(self.device, torch.float32)).latent_dist
        z = dist.mean
        if self.latents == "sample":  # one noise draw shared by every image: reproducible
            gen = torch.Generator().manual_seed(latent_noise_seed(self.seed))
            eps = torch.randn(tuple(z.shape[1:]), generator=gen).to(z.device)
            z = z + dist.std * eps
        return z * self.scaling_factor

    # -- conditioning ---------------------------------------------------------------------

    def model_kwargs(self, data: ConditioningData, n: int) -> dict[str, torch.Tensor]:
        """The UNet's per-sample conditioning keyword arguments for ``n`` rows."""
        if self.kind == "none":
            return {}
        if self.kind == "class":
            if data.labels is None:
                raise DataError("this index is class-conditional: pass labels=[...] (CLI --label)")
            labels = as_labels(data.labels, n)
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise DataError(
                    f"labels span [{labels.min()}, {labels.max()}] but the model has "
                    f"{self.num_classes} classes (0..{self.num_classes - 1})"
                )
            return {"class_labels": torch.from_numpy(labels).to(self.device)}
        if data.prompts is None:
            raise DataError("this index is text-conditional: pass prompts=[...] (CLI --prompt)")
        prompts = as_prompts(data.prompts, n)
        return {"encoder_hidden_states": torch.stack([self.encode_prompt(p) for p in prompts])}

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """One prompt → the text encoder's last hidden state [L, E], as diffusers' training
        scripts compute it (padded to the tokenizer's max length, truncated); cached. Encoded
        alone, so its numbers do not depend on which other prompts share a batch."""
        hit = self._prompt_cache.get(prompt)
        if hit is None:
            ids = self.tokenizer(
                [prompt],
                max_length=self.tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if len(self._prompt_cache) >= PROMPT_CACHE:  # drop the oldest: bounded memory
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            hit = self._prompt_cache[prompt] = self.text_encoder(ids, return_dict=False)[0][0]
        return hit

    def labels_from(self, labels: Any, n: int) -> np.ndarray:
        """Query labels as integers; class names (from class sub-folders) are accepted too."""
        values = [labels] * n if isinstance(labels, (str, int, np.integer)) else list(labels)
        if self.class_names:
            lookup = {name: i for i, name in enumerate(self.class_names)}
            values = [lookup.get(v, v) if isinstance(v, str) else v for v in values]
        if any(isinstance(v, str) for v in values):
            bad = next(v for v in values if isinstance(v, str))
            if not bad.lstrip("-").isdigit():
                raise DataError(
                    f"label {bad!r} is not a class of this index"
                    + (f" ({', '.join(self.class_names)})" if self.class_names else "")
                )
            values = [int(v) if isinstance(v, str) else v for v in values]
        return as_labels(np.asarray(values), n)


def _has_component(folder: Path, name: str) -> bool:
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

            cls_name = json.loads((folder / "config.json").read_text()).get(
                "_class_name", "AutoencoderKL"
            )
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
        arch = json.loads((folder / "config.json").read_text()).get("architectures") or [
            "CLIPTextModel"
        ]
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
