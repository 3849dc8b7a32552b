"""Shared fixtures: tiny diffusers UNets built from config (no downloads) and small images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

# the CI machine has 2 cores; OMP_NUM_THREADS (e.g. 1 on a machine shared with other jobs,
# where OpenMP threads spin against each other) wins when set
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(2)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """model in eval mode with its weights nudged, so checkpoints differ beyond their
    initialisation and outputs are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_unet(seed: int, sample_size: int = 8, channels: int = 1, **config) -> UNet2DModel:
    """A ~30k-parameter UNet2DModel with an attention block, randomly initialised under seed;
    ``config`` adds UNet2DModel arguments (e.g. ``num_class_embeds``)."""
    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        **config,
    )
    return perturbed(model)


def scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


@pytest.fixture
def images() -> np.ndarray:
    """7 float images in [0, 1], [N, 1, 8, 8]."""
    rng = np.random.default_rng(0)
    return rng.random((7, 1, 8, 8), dtype=np.float32)


@pytest.fixture
def saved_checkpoints(tmp_path):
    """Two checkpoint folders in diffusers' training layout plus the final pipeline folder."""
    from diffusers import DDPMPipeline

    run = tmp_path / "run"
    paths = []
    for i, seed in enumerate((1, 2)):
        model = tiny_unet(seed)
        ckpt = run / f"checkpoint-{(i + 1) * 10}"
        model.save_pretrained(ckpt / "unet")
        paths.append(ckpt)
    DDPMPipeline(unet=tiny_unet(2), scheduler=scheduler()).save_pretrained(run)
    return paths


# -- conditional and latent models (tests/diffusion_refs.py builds the components) ------------


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A tiny Stable-Diffusion-layout run folder (unet, vae, text encoder, tokenizer)."""
    from tests.diffusion_refs import make_sd_run

    return make_sd_run(tmp_path_factory.mktemp("sd") / "run", tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def pixels():
    from tests.diffusion_refs import random_pixels

    return random_pixels()


@pytest.fixture
def caption_folder(tmp_path, pixels):
    from tests.diffusion_refs import write_caption_folder

    return write_caption_folder(tmp_path / "train", pixels)


@pytest.fixture(params=["hooks", "vmap"])
def backend(request, monkeypatch):
    """Every build in the test uses this gradient backend."""
    from tests.diffusion_refs import use_backend

    return use_backend(monkeypatch, request.param)


def assert_rows_close(actual: np.ndarray, desired: np.ndarray) -> None:
    """Rows equal up to float32 summation order (another batch size or thread count sums the
    per-draw gradients in another order): within 1e-4 relative, or 1e-5 of the row's largest
    entry for entries near zero. A real change of the rows moves them by O(1) relative."""
    desired = np.asarray(desired, dtype=np.float64)
    scale = np.abs(desired).max(axis=-1, keepdims=True)
    np.testing.assert_array_less(
        np.abs(np.asarray(actual) - desired), 1e-4 * np.abs(desired) + 1e-5 * scale + 1e-30
    )


def run(*args):
    """The CLI run in-process on these arguments (click's CliRunner)."""
    from click.testing import CliRunner

    from gradindex.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(res) -> str:
    """The one ``Error:`` line of a failed CLI run (exit 1, no traceback)."""
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]
