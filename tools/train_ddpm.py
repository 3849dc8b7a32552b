"""Train the small demo DDPM: ``python tools/train_ddpm.py --out DIR [--steps N] [--data FILE]``.

A thin command around ``gradindex.demo.training.train_ddpm``. Trains on scikit-learn's digits
(upsampled to ``--size``) by default, or on ``--data``: a .npy/.npz array of images
[N, H, W] / [N, C, H, W] / [N, H, W, C] (uint8, or floats in [0, 1]), an HDF5 dataset
(``file.h5:/images``) or a folder of image files. Writes diffusers' training layout into DIR
(``checkpoint-<step>/unet`` + the final ``DDPMPipeline``) and prints a JSON summary.
A finished run in DIR with the same settings is reused.
"""

from __future__ import annotations

import inspect
import json
import logging
import time

import click
import numpy as np

from gradindex.demo.training import load_digits_images, small_unet_config, train_ddpm
from gradindex.errors import GradIndexError

D = {k: p.default for k, p in inspect.signature(train_ddpm).parameters.items()}


@click.command(help=__doc__.split("\n\n")[1])
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (checkpoints + final pipeline).",
)
@click.option(
    "--data",
    default=None,
    help="Images to train on (.npy/.npz/.h5:/dataset/folder); default: digits.",
)
@click.option("--size", default=16, show_default=True, help="Digits image size (digits only).")
@click.option("--steps", default=D["steps"], show_default=True, help="Optimizer steps.")
@click.option("--batch-size", default=D["batch_size"], show_default=True)
@click.option(
    "--lr",
    "learning_rate",
    default=D["learning_rate"],
    show_default=True,
    help="Peak learning rate.",
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine"]),
    default=D["lr_schedule"],
    show_default=True,
)
@click.option("--warmup-steps", default=D["warmup_steps"], show_default=True)
@click.option("--checkpoint-every", default=D["checkpoint_every"], show_default=True)
@click.option(
    "--channels",
    default="16,32,64",
    show_default=True,
    help="UNet block_out_channels, comma-separated (multiples of 8).",
)
@click.option("--seed", default=D["seed"], show_default=True)
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(
    out_dir: str,
    data: str | None,
    size: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    lr_schedule: str,
    warmup_steps: int,
    checkpoint_every: int,
    channels: str,
    seed: int,
    threads: int | None,
    quiet: bool,
) -> None:
    import torch

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        chans = tuple(int(c) for c in channels.split(","))
    except ValueError:
        raise click.BadParameter("give integers like 16,32,64", param_hint="--channels") from None
    try:
        images = load_digits_images(size) if data is None else _load(data)
        config = small_unet_config(images.shape[-1], images.shape[1], chans)
        start = time.perf_counter()
        result = train_ddpm(
            images,
            out_dir,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            checkpoint_every=checkpoint_every,
            seed=seed,
            unet_config=config,
            progress=not quiet,
        )
    except GradIndexError as exc:
        raise click.ClickException(str(exc)) from None
    summary = {
        "out_dir": str(result.out_dir),
        "checkpoints": [str(p) for p in result.checkpoints],
        "learning_rate": result.learning_rate,
        "steps_between_checkpoints": result.steps_between_checkpoints,
        "final_loss": float(np.mean(result.losses[-50:])),
        "seconds": round(time.perf_counter() - start, 1),
    }
    click.echo(json.dumps(summary, indent=2))


def _load(data: str) -> np.ndarray:
    """Any source ``gradindex.inputs.query_images.load_images`` reads -> float32 [N, C, H, W] in [0, 1]."""
    from gradindex.inputs.query_images import load_images

    images, _ = load_images(data)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)  # train_ddpm rejects values outside [0, 1]


if __name__ == "__main__":
    main()
