"""A checkpoint's config is part of what the index was built with: editing config.json or
scheduler_config.json after the build (same weights, other gradients) is refused, naming what
changed; indexes built before configs were recorded still open, saying what cannot be checked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import DDPMPipeline

import gradindex as gi
from gradindex.build.append import add_samples
from gradindex.build.shards import merge_shards
from gradindex.cli.main import main
from gradindex.store.layout import MANIFEST, read_manifest, write_json_atomic
from tests.conftest import assert_rows_close, scheduler, tiny_unet

SPEC = gi.BuildSpec(proj_dim=32, timesteps=3, batch_size=4)


@pytest.fixture
def built(tmp_path):
    """An index over 6 images at one checkpoint folder (a pipeline: unet/ + scheduler/)."""
    DDPMPipeline(unet=tiny_unet(3), scheduler=scheduler()).save_pretrained(tmp_path / "ckpt")
    images = np.random.default_rng(2).random((6, 1, 8, 8), dtype=np.float32)
    gi.build_index(checkpoints=[tmp_path / "ckpt"], data=images, out=tmp_path / "idx",
                   spec=SPEC, progress=False, fidelity_sample=0)  # fmt: skip
    return tmp_path, images


def _edit(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _query_error(root, images) -> str:
    np.save(root / "q.npy", images[:1])
    res = CliRunner().invoke(main, ["query", str(root / "idx"), str(root / "q.npy")])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.mark.parametrize(
    "file,changes,named",
    [
        ("scheduler/scheduler_config.json", {"beta_end": 0.03}, "noise schedule"),
        (
            "scheduler/scheduler_config.json",
            {"beta_schedule": "squaredcos_cap_v2"},
            "beta_schedule",
        ),
        ("unet/config.json", {"act_fn": "mish"}, "act_fn"),
        ("unet/config.json", {"norm_eps": 1e-3}, "norm_eps"),
    ],
)
def test_an_edited_config_is_refused_naming_it(built, file, changes, named):
    """The probe's case: same weights, edited config; the query's gradients differ from the
    stored rows', so it must not answer."""
    root, images = built
    idx = gi.AttributionIndex.open(root / "idx")
    stored = idx.vectors("tracin")[:1]
    assert_rows_close(idx.embed(images[:1])["tracin"], stored)  # before the edit: reproduced
    _edit(root / "ckpt" / file, **changes)
    line = _query_error(root, images)
    assert named in line and "rebuild the index" in line
    assert f"{next(iter(changes))}:" in line  # the key, with its old and new value
    with pytest.raises(gi.ModelError, match=named):
        gi.AttributionIndex.open(root / "idx").embed(images[:1])
    with pytest.raises(gi.ModelError, match=named):  # add uses the same checkpoints
        add_samples(root / "idx", images[:2] * 0.5, progress=False)


def test_sampling_only_scheduler_keys_do_not_change_the_answer(built):
    """clip_sample / variance_type are used only for sampling: the rows are still reproduced."""
    root, images = built
    _edit(
        root / "ckpt/scheduler/scheduler_config.json",
        clip_sample=False,
        variance_type="fixed_large",
    )
    idx = gi.AttributionIndex.open(root / "idx")
    assert_rows_close(idx.embed(images[:2])["tracin"], idx.vectors("tracin")[:2])


def test_an_index_without_config_records_opens_and_says_what_it_cannot_check(built):
    root, images = built
    manifest = read_manifest(root / "idx")
    for record in manifest["checkpoints"]:
        del record["config"]  # as written before configs were recorded
    write_json_atomic(root / "idx" / MANIFEST, manifest)
    idx = gi.AttributionIndex.open(root / "idx")
    with pytest.warns(UserWarning, match="cannot|not the model's config.json"):
        got = idx.embed(images[:1])["tracin"]
    assert_rows_close(got, idx.vectors("tracin")[:1])
    np.save(root / "q.npy", images[:1])
    res = CliRunner().invoke(main, ["query", str(root / "idx"), str(root / "q.npy"), "-k", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count("Warning: this index was built before checkpoint configs") == 1


def test_shards_from_an_edited_checkpoint_are_not_merged(built):
    root, images = built
    a = gi.build_index(checkpoints=[root / "ckpt"], data=images, out=root / "s0", spec=SPEC,
                       shard=(0, 2), progress=False, fidelity_sample=0)  # fmt: skip
    shutil.copytree(root / "ckpt", root / "ckpt2")
    _edit(root / "ckpt2/unet/config.json", act_fn="mish")
    b = gi.build_index(checkpoints=[root / "ckpt2"], data=images, out=root / "s1", spec=SPEC,
                       shard=(1, 2), progress=False, fidelity_sample=0)  # fmt: skip
    with pytest.raises(gi.IndexStateError, match="checkpoint configs differ"):
        merge_shards(root / "m", [a.path, b.path])


def test_an_edited_vae_config_is_refused(tmp_path, sd_run, caption_folder, pixels):
    """A latent model's VAE config (its scaling_factor scales every latent) counts too."""
    from tests.diffusion_refs import CAPTIONS

    run = tmp_path / "run"
    shutil.copytree(sd_run, run)
    gi.build_index(checkpoints=[run / "checkpoint-1"], data=str(caption_folder),
                   out=tmp_path / "idx", spec=SPEC, progress=False, fidelity_sample=0)  # fmt: skip
    idx = gi.AttributionIndex.open(tmp_path / "idx")
    stored = idx.vectors("retrac")[:1]
    assert_rows_close(idx.embed(pixels[:1], prompts=CAPTIONS[0])["retrac"], stored)
    _edit(run / "vae" / "config.json", scaling_factor=0.5)
    with pytest.raises(gi.ModelError, match=r"vae's config changed .*scaling_factor"):
        gi.AttributionIndex.open(tmp_path / "idx").embed(pixels[:1], prompts=CAPTIONS[0])


def test_a_lora_checkpoint_records_its_adapter_and_checks_its_base_config(
    tmp_path, sd_run, caption_folder, pixels
):
    """LoRA: the adapter's settings are recorded; an edited base UNet config.json is refused."""
    pytest.importorskip("peft")
    from tests.diffusion_refs import CAPTIONS
    from tests.inputs.test_lora import lora_unet, save_lora

    base = tmp_path / "base"
    shutil.copytree(sd_run, base)
    save_lora(lora_unet(11), tmp_path / "lora")
    idx = gi.build_index(checkpoints=[tmp_path / "lora"], base_model=base, out=tmp_path / "idx",
                         data=str(caption_folder), spec=SPEC, progress=False,
                         fidelity_sample=0)  # fmt: skip
    peft = idx.manifest["checkpoints"][0]["config"]["model"]["peft"]
    assert peft["default"]["r"] == 2 and peft["default"]["lora_alpha"] == 2
    _edit(base / "unet" / "config.json", act_fn="mish")
    with pytest.raises(gi.ModelError, match="model config changed .*act_fn"):
        gi.AttributionIndex.open(tmp_path / "idx").embed(pixels[:1], prompts=CAPTIONS[0])
