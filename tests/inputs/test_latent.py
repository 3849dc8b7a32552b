"""Text-to-image latent models (Stable-Diffusion layout): stored rows against an independent
per-sample autograd loop, caption-conditioned self-retrieval, latents knob, captions in data.

Tiny components are built from configs (no downloads): a CLIPTokenizer from a vocab.json and
merges.txt written here, a CLIPTextModel, an AutoencoderKL and a UNet2DConditionModel whose
cross_attention_dim is the text hidden size, saved with save_pretrained.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

import gradindex as gi  # noqa: E402
from gradindex.cli.main import main  # noqa: E402
from tests.diffusion_refs import (  # noqa: E402
    CAPTIONS,
    reference_inputs,
    reference_rows,
    rel_err,
    tiny_unet,
)


def test_text_latent_rows_match_autograd_loop(tmp_path, sd_run, caption_folder, pixels, backend):
    weights = (0.5, 2.0)
    spec = gi.BuildSpec(
        projection="identity", timesteps=2, noise_draws=2, checkpoint_weights=weights, batch_size=4
    )
    idx = gi.build_index(
        checkpoints=[sd_run / "checkpoint-1", sd_run],
        data=str(caption_folder),
        out=tmp_path / "idx",
        spec=spec,
        progress=False,
    )
    assert idx._get_embedder().featurizers[0].backend == backend
    models = [
        UNet2DConditionModel.from_pretrained(p / "unet") for p in (sd_run / "checkpoint-1", sd_run)
    ]
    latents, conds = reference_inputs(sd_run, pixels, CAPTIONS)
    sched = DDPMScheduler.from_pretrained(sd_run / "scheduler")
    ref_t, ref_r, ref_n = reference_rows(models, sched, latents, conds, idx.spec, weights)
    assert idx.vectors("tracin").shape == ref_t.shape
    assert rel_err(idx.vectors("tracin"), ref_t).max() <= 1e-4
    assert rel_err(idx.vectors("retrac"), ref_r).max() <= 1e-4
    np.testing.assert_allclose(idx.norms, ref_n, rtol=1e-4)
    with h5py.File(tmp_path / "idx" / "vectors.h5", "r") as f:  # cached with the rows
        np.testing.assert_allclose(f["latents"][()], latents.numpy(), rtol=1e-5, atol=1e-6)
        assert f["prompts"].asstr()[()].tolist() == CAPTIONS
    rec = idx.conditioning
    assert rec["kind"] == "text" and rec["latent"] and rec["latents"] == "mean"
    assert rec["scaling_factor"] == pytest.approx(0.18215)
    assert set(rec["components"]) == {"vae", "text_encoder", "tokenizer"}


def test_caption_query_self_retrieval(tmp_path, sd_run, caption_folder, pixels):
    idx = gi.build_index(
        checkpoints=[sd_run / "checkpoint-1", sd_run],
        data=str(caption_folder),
        out=tmp_path / "idx",
        spec=gi.BuildSpec(proj_dim=256, timesteps=3, batch_size=4),
        progress=False,
    )
    idx = gi.AttributionIndex.open(tmp_path / "idx")  # reloads every component from disk
    for i, caption in enumerate(CAPTIONS):  # each training pair finds itself at rank 1
        res = idx.query(pixels[i : i + 1], k=3, method="retrac", prompts=caption)
        assert res.ids[0, 0] == f"{i}.png", (i, res.ids)
    # the caption is part of the query: the same image under another caption is another vector
    same = idx.embed(pixels[:1], prompts=CAPTIONS[0])["retrac"]
    other = idx.embed(pixels[:1], prompts=CAPTIONS[1])["retrac"]
    assert rel_err(same, idx.vectors("retrac")[:1]).max() <= 1e-4
    assert rel_err(other, same).min() > 1e-2
    with pytest.raises(gi.DataError, match="text-conditional: pass prompts"):
        idx.query(pixels[:1])
    with pytest.raises(gi.DataError, match="one prompt per image"):
        idx.query(pixels[:2], prompts=CAPTIONS[:3])
    # CLI: the prompt comes from --prompt, or from the query folder's metadata.jsonl
    res = CliRunner().invoke(
        main,
        ["query", str(tmp_path / "idx"), str(caption_folder / "3.png"), "-k", "1"]
        + ["--method", "retrac", "--prompt", CAPTIONS[3], "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ids"] == ["3.png"]
    res = CliRunner().invoke(
        main, ["query", str(tmp_path / "idx"), str(caption_folder), "-k", "1", "--json"]
    )
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in res.output.splitlines()]
    assert [r["ids"][0] for r in recs if r["method"] == "retrac"] == [f"{i}.png" for i in range(6)]


def test_sampled_latents_and_caption_list(tmp_path, sd_run, pixels):
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, latents="sample", seed=3)
    idx = gi.build_index(
        checkpoints=[sd_run],
        data=pixels,
        prompts=CAPTIONS,
        out=tmp_path / "idx",
        spec=spec,
        progress=False,
    )
    sampled, _ = reference_inputs(sd_run, pixels, CAPTIONS, sample=True, seed=3)
    mean, _ = reference_inputs(sd_run, pixels, CAPTIONS)
    with h5py.File(tmp_path / "idx" / "vectors.h5", "r") as f:
        stored = f["latents"][()]
    np.testing.assert_allclose(stored, sampled.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(stored - mean.numpy()).max() > 1e-3
    # the seeded sample is the same at query time: training pairs reproduce their rows
    emb = idx.embed(pixels, prompts=CAPTIONS)
    assert rel_err(emb["tracin"], idx.vectors("tracin")).max() <= 1e-4


def test_text_model_errors(tmp_path, sd_run, pixels):
    build = dict(spec=gi.BuildSpec(proj_dim=64, timesteps=2), progress=False)
    with pytest.raises(gi.DataError, match="no captions were found"):
        gi.build_index(checkpoints=[sd_run], data=pixels, out=tmp_path / "a", **build)
    with pytest.raises(gi.DataError, match="one prompt per image"):
        gi.build_index(
            checkpoints=[sd_run], data=pixels, prompts=CAPTIONS[:2], out=tmp_path / "b", **build
        )
    bare = tmp_path / "bare"  # a UNet without text encoder / tokenizer anywhere near it
    tiny_unet(1).save_pretrained(bare / "unet")
    DDPMScheduler().save_pretrained(bare / "scheduler")
    with pytest.raises(gi.ModelError, match="needs text_encoder/ and tokenizer/"):
        gi.build_index(
            checkpoints=[bare], data=pixels, prompts=CAPTIONS, out=tmp_path / "c", **build
        )
    # base_model supplies them
    idx = gi.build_index(
        checkpoints=[bare],
        data=pixels,
        prompts=CAPTIONS,
        base_model=sd_run,
        out=tmp_path / "d",
        **build,
    )
    assert idx.conditioning["components"]["vae"]["source"] == str((sd_run / "vae").resolve())
    for name in "abc":
        assert not (tmp_path / name / "manifest.json").exists()
