"""Shared test helpers for conditional and latent models: an independent per-sample autograd
reference, tiny Stable-Diffusion-layout components built from configs (no downloads), and a
switch of the gradient backend every build uses."""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradindex.featurize.embedding
from gradindex.featurize.gradients import GradientFeaturizer
from tests.conftest import perturbed

TEXT_DIM = 16
MAX_LEN = 12
CAPTIONS = ["a red cat", "a blue dog", "two green birds", "a red dog", "one cat", "a dog"]


def use_backend(monkeypatch, backend: str) -> str:
    """Make every build / query of the test take per-item gradients with ``backend``."""
    monkeypatch.setattr(
        gradindex.featurize.embedding,
        "GradientFeaturizer",
        functools.partial(GradientFeaturizer, backend=backend),
    )
    return backend


def reference_rows(models, sched, x0s, conds, spec, weights, loss="mse", names=None, scales=None):
    """Plain loop: one sample, one draw, one torch.autograd.grad at a time, in float64 sums,
    with diffusers' own add_noise / get_velocity (DESIGN §1 computed independently of gradindex).
    x0s: [N, C, H, W] in the model's range; conds: per-sample conditioning kwargs of the model
    ({"class_labels": [1]} / {"encoder_hidden_states": [1, L, E]}); names: parameters to
    differentiate (all when None), in named_parameters order; scales: per model, a [p] vector
    every per-draw gradient is multiplied by first (a preconditioner), or None."""
    draws = spec.draws(x0s.shape[1:])
    K, M = spec.num_timesteps, spec.noise_draws
    tracin_rows, retrac_rows, norm_rows = [], [], []
    scales = scales or [None] * len(models)
    for x, cond in zip(x0s, conds):
        t_blocks, r_blocks, n_blocks = [], [], []
        for model, w, scale in zip(models, weights, scales):
            params = [p for n, p in model.named_parameters() if names is None or n in names]
            per_k, norms = [], []
            for k in range(K):
                gs = []
                for m in range(M):
                    t, eps = draws[k * M + m]
                    tt = torch.tensor([t])
                    x_t = sched.add_noise(x[None], eps[None], tt)
                    out = model(x_t, tt, **cond).sample
                    if sched.config.prediction_type == "epsilon":
                        target = eps[None]
                    else:
                        target = sched.get_velocity(x[None], eps[None], tt)
                    if loss == "mse":
                        value = F.mse_loss(out, target)
                    elif loss == "l1":
                        value = F.l1_loss(out, target)
                    else:
                        value = out.pow(2).mean()
                    g = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(value, params)])
                    g = g.double() if scale is None else g.double() * scale.double()
                    gs.append(g.double())
                    norms.append(g.double().norm())
                per_k.append(torch.stack(gs).mean(0))
            a = torch.stack(per_k).mean(0)
            r = torch.stack([g / g.norm() for g in per_k]).mean(0)
            t_blocks.append(np.sqrt(w) * a)
            r_blocks.append(np.sqrt(w) * r / r.norm())
            n_blocks.append(torch.stack(norms))
        tracin_rows.append(torch.cat(t_blocks))
        retrac_rows.append(torch.cat(r_blocks))
        norm_rows.append(torch.stack(n_blocks))
    return (
        torch.stack(tracin_rows).numpy(),
        torch.stack(retrac_rows).numpy(),
        torch.stack(norm_rows).numpy(),
    )


def rel_err(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def tiny_tokenizer(folder: Path):
    """A character-level CLIP BPE vocabulary (letters, letters ending a word, specials)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LEN
    )


def tiny_unet(seed: int):
    """A tiny UNet2DConditionModel cross-attending to TEXT_DIM-wide text states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    return perturbed(unet)


def make_sd_run(run: Path, vocab_dir: Path) -> Path:
    """A Stable-Diffusion-layout run folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) plus checkpoint-1/unet as diffusers' training scripts write it."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer(vocab_dir)
    tok.save_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_LEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(cfg).save_pretrained(run / "text_encoder")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        layers_per_block=1,
    ).save_pretrained(run / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(run / "scheduler")
    tiny_unet(1).save_pretrained(run / "checkpoint-1" / "unet")
    tiny_unet(2).save_pretrained(run / "unet")
    return run


def random_pixels() -> np.ndarray:
    """6 RGB uint8 images at the tiny VAE's 16×16."""
    return np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


def write_caption_folder(folder: Path, pixels: np.ndarray) -> Path:
    """An image folder with metadata.jsonl (file_name, text), as diffusers' text_to_image reads."""
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i, (im, caption) in enumerate(zip(pixels, CAPTIONS)):
        Image.fromarray(im).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def reference_inputs(run, pixels, captions, sample=False, seed=0):
    """Latents and text states computed independently: diffusers / transformers calls as a
    training script makes them, one image and one caption at a time."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from gradindex.inputs.encoders import latent_noise_seed

    vae = AutoencoderKL.from_pretrained(run / "vae").eval()
    tok = CLIPTokenizer.from_pretrained(run / "tokenizer")
    te = CLIPTextModel.from_pretrained(run / "text_encoder").eval()
    latents, conds = [], []
    with torch.no_grad():
        for im, caption in zip(pixels, captions):
            x = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 127.5 - 1
            dist = vae.encode(x).latent_dist
            z = dist.mean
            if sample:
                gen = torch.Generator().manual_seed(latent_noise_seed(seed))
                z = z + dist.std * torch.randn(z.shape[1:], generator=gen)
            latents.append(z[0] * vae.config.scaling_factor)
            ids = tok(
                caption,
                max_length=MAX_LEN,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids
            conds.append({"encoder_hidden_states": te(ids)[0]})
    return torch.stack(latents), conds
