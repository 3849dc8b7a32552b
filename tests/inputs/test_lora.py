"""LoRA checkpoints (pytorch_lora_weights.safetensors on a base UNet, as diffusers' LoRA
scripts write them): gradients over the adapter weights only, against an independent
per-sample autograd loop, in both gradient backends; parameter globs; bad folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers import DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import gradindex as gi  # noqa: E402
from gradindex.inputs.lora import LORA_WEIGHTS, lora_parameter_count  # noqa: E402
from tests.diffusion_refs import (  # noqa: E402
    CAPTIONS,
    reference_inputs,
    reference_rows,
    rel_err,
    tiny_unet,
)


def lora_unet(seed: int):
    """The base UNet of sd_run with a rank-2 adapter on the attention projections, as
    train_text_to_image_lora.py configures it, moved off its zero initialisation."""
    unet = tiny_unet(2)  # = sd_run/unet
    unet.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return unet.eval()


def save_lora(unet, folder):
    """What the LoRA training script's save hook does."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)


@pytest.fixture
def lora_run(tmp_path):
    """output_dir/checkpoint-1/ and output_dir/ with LoRA weights only (no unet/, no scheduler/)."""
    out = tmp_path / "lora_out"
    models = [lora_unet(11), lora_unet(12)]
    save_lora(models[0], out / "checkpoint-1")
    save_lora(models[1], out)
    return [out / "checkpoint-1", out], models


def test_lora_rows_match_autograd_loop(tmp_path, sd_run, lora_run, caption_folder, pixels, backend):
    folders, models = lora_run
    assert (folders[0] / LORA_WEIGHTS).exists()
    weights = (1.0, 3.0)
    spec = gi.BuildSpec(
        projection="identity", timesteps=2, noise_draws=2, checkpoint_weights=weights, batch_size=4
    )
    idx = gi.build_index(
        checkpoints=folders,
        base_model=sd_run,
        data=str(caption_folder),
        out=tmp_path / "idx",
        spec=spec,
        progress=False,
    )
    assert idx._get_embedder().featurizers[0].backend == backend
    names = [n for n, _ in models[0].named_parameters() if "lora_" in n]
    assert idx.manifest["num_params"] == lora_parameter_count(models[0]) == 1376
    assert idx.manifest["num_params"] < sum(p.numel() for p in models[0].parameters()) / 30
    latents, conds = reference_inputs(sd_run, pixels, CAPTIONS)
    sched = DDPMScheduler.from_pretrained(sd_run / "scheduler")
    ref_t, ref_r, ref_n = reference_rows(
        models, sched, latents, conds, idx.spec, weights, names=names
    )
    assert rel_err(idx.vectors("tracin"), ref_t).max() <= 1e-4
    assert rel_err(idx.vectors("retrac"), ref_r).max() <= 1e-4
    np.testing.assert_allclose(idx.norms, ref_n, rtol=1e-4)
    # reopened: the base model recorded in the manifest rebuilds the same adapted UNets
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    res = idx.query(pixels, k=1, method="retrac", prompts=CAPTIONS)
    assert res.ids[:, 0].tolist() == [f"{i}.png" for i in range(6)]


def test_lora_param_glob(tmp_path, sd_run, lora_run, pixels):
    folders, models = lora_run
    spec = gi.BuildSpec(projection="identity", timesteps=2, params=("*attn2*lora_B*",))
    build = dict(base_model=sd_run, data=pixels[:2], prompts=CAPTIONS[:2], progress=False)
    idx = gi.build_index(checkpoints=folders[:1], out=tmp_path / "g", spec=spec, **build)
    full = gi.build_index(
        checkpoints=folders[:1], out=tmp_path / "f", spec=spec.replace(params=None), **build
    )
    names = [n for n, _ in models[0].named_parameters() if "lora_" in n]
    sizes = {n: p.numel() for n, p in models[0].named_parameters()}
    offsets = np.cumsum([0] + [sizes[n] for n in names])
    cols = np.concatenate(
        [
            np.arange(offsets[i], offsets[i + 1])
            for i, n in enumerate(names)
            if "attn2" in n and "lora_B" in n
        ]
    )
    assert idx.manifest["num_params"] == len(cols) > 0
    assert full._get_embedder().featurizers[0].backend == "hooks"  # auto: peft layers supported
    assert rel_err(idx.vectors("tracin"), full.vectors("tracin")[:, cols]).max() <= 1e-5


def test_lora_errors(tmp_path, sd_run, lora_run, pixels):
    folders, _ = lora_run
    build = dict(data=pixels[:2], prompts=CAPTIONS[:2], spec=gi.BuildSpec(proj_dim=64, timesteps=2))
    with pytest.raises(gi.ModelError, match="needs its base model"):
        gi.build_index(checkpoints=folders, out=tmp_path / "a", progress=False, **build)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / LORA_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(gi.ModelError, match="not a readable safetensors"):
        gi.build_index(
            checkpoints=[tmp_path / "bad"],
            base_model=sd_run,
            out=tmp_path / "b",
            progress=False,
            **build,
        )
    assert not (tmp_path / "a" / "manifest.json").exists()
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_lora_cli_worked_example(tmp_path, sd_run, lora_run, caption_folder):
    """The README's LoRA example, on tiny components; a changed text encoder is refused."""
    import json
    import shutil

    from click.testing import CliRunner
    from transformers import CLIPTextModel

    from gradindex.cli.main import main

    base = tmp_path / "sd-base"
    shutil.copytree(sd_run, base)
    folders, _ = lora_run
    out = tmp_path / "lora_index"
    res = CliRunner().invoke(
        main,
        ["build", "--base-model", str(base), "-c", str(folders[0]), "-c", str(folders[1])]
        + ["--data", str(caption_folder), "--out", str(out), "--checkpoint-weights", "1e-4,1e-4"]
        + ["--timesteps", "2", "--proj-dim", "64", "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["num_params"] == 1376
    query = ["query", str(out), str(caption_folder / "2.png"), "-k", "1", "--method", "retrac"]
    res = CliRunner().invoke(main, [*query, "--prompt", CAPTIONS[2], "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ids"] == ["2.png"]
    te = CLIPTextModel.from_pretrained(base / "text_encoder")
    with torch.no_grad():
        next(te.parameters()).add_(0.1)
    te.save_pretrained(base / "text_encoder")
    res = CliRunner().invoke(main, [*query, "--prompt", CAPTIONS[2]])
    assert res.exit_code == 1
    assert "the text_encoder differs from the one the index was built with" in res.output
