"""Generating images from a trained DDPM pipeline folder (the demo's queries).

Holds ``sample_images(pipeline_dir, n, ...)``: float [n, C, H, W] images in [0, 1], by
ancestral DDPM sampling or deterministic DDIM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradindex.errors import DataError, ModelError

SAMPLERS = ("ddim", "ddpm")


def sample_images(
    pipeline_dir: str | Path,
    n: int,
    seed: int = 0,
    num_inference_steps: int = 250,
    sampler: str = "ddpm",
) -> np.ndarray:
    """Generate ``n`` images with the pipeline in ``pipeline_dir``: float [n, C, H, W] in [0, 1].

    sampler: ``"ddpm"`` (ancestral sampling, the training scheduler; wants a few hundred steps
    and gives the cleanest digits on the demo model) or ``"ddim"`` (deterministic, eta=0; ~50
    steps, a little blurrier). Same seed -> same images.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    if sampler not in SAMPLERS:
        raise DataError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    try:
        # low_cpu_mem_usage=False: the small model loads directly (no `accelerate` needed or warned about)
        pipe = DDPMPipeline.from_pretrained(str(pipeline_dir), low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{pipeline_dir}: not a DDPMPipeline folder ({exc})") from None
    if sampler == "ddim":
        ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe = DDIMPipeline(unet=pipe.unet, scheduler=ddim)
    pipe.set_progress_bar_config(disable=True)
    extra = {"eta": 0.0} if sampler == "ddim" else {}
    gen = torch.Generator().manual_seed(seed)
    out = pipe(n, gen, num_inference_steps=num_inference_steps, output_type="np", **extra).images
    return np.ascontiguousarray(np.asarray(out, np.float32).transpose(0, 3, 1, 2))  # [n, C, H, W]
