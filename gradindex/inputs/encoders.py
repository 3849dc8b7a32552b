"""The Conditioner of one index: what the UNet is given besides the noisy image.

Turns labels / prompts into the UNet's keyword arguments (``class_labels`` [B];
``encoder_hidden_states`` [B, L, E], each prompt encoded once by the frozen text encoder and
cached) and pixel images into scaled VAE latents (the latent distribution's mean, or one seeded
sample with the same noise for every image, so a training image re-encoded at query time gets
its stored latent). The text encoder, tokenizer and VAE come from a Stable-Diffusion-layout
folder (``vae/``, ``text_encoder/``, ``tokenizer/``). Gradients are taken over the UNet only: the
VAE and text encoder run under ``no_grad``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradindex.errors import DataError, ModelError
from gradindex.inputs.components import (
    component_fingerprint,
    config_record,
    has_component,
    load_component,
)
from gradindex.inputs.labels import ConditioningData, as_labels, as_prompts, conditioning_kind
from gradindex.inputs.models import Checkpoint

logger = logging.getLogger(__name__)

COMPONENTS = ("vae", "text_encoder", "tokenizer")
PROMPT_CACHE = 4096  # encoded prompts kept in memory ([L, E] each)


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
                found = next((f / name for f in folders if has_component(f / name, name)), None)
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
            if not has_component(folder, name):
                raise ModelError(f"{folder}: the index's {name} is missing; pass base_model=DIR")
            components[name] = load_component(folder, name)
        for name, obj in components.items():
            want = recorded[name]["fingerprint"]
            if component_fingerprint(obj) != want:
                raise ModelError(
                    f"the {name} differs from the one the index was built with "
                    f"(fingerprint {component_fingerprint(obj)} vs {want}); rebuild the index"
                )
            _check_config(name, obj, recorded[name].get("config"))
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
                "config": config_record(obj),  # e.g. the VAE's scaling_factor
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


def _check_config(name: str, obj: Any, recorded: dict[str, Any] | None) -> None:
    """Refuse a component whose config (keys both sides hold) changed since the build: same
    weights, other latents or text embeddings. Records from before configs were kept pass."""
    if not isinstance(recorded, dict):
        return
    now = config_record(obj)
    keys = [k for k in sorted(set(recorded) & set(now)) if recorded[k] != now[k]]
    if keys:
        raise ModelError(
            f"the {name}'s config changed since the index was built ({', '.join(keys[:3])}); "
            "restore it, or rebuild the index"
        )
