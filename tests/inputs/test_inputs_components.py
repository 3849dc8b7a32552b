"""inputs/components.py: which classes a config may name, weight fingerprints (recomputed with
hashlib here), config records and the noise-schedule digest, on tiny saved models."""

from __future__ import annotations

import hashlib
import json

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gradindex.errors import ModelError
from gradindex.inputs.components import (
    checkpoint_config,
    config_record,
    diffusers_class,
    fingerprint_module,
    load_model,
    load_scheduler,
    noise_schedule_digest,
    weights_format,
)
from tests.conftest import tiny_unet


def test_a_config_may_name_only_model_or_scheduler_classes():
    assert diffusers_class("UNet2DModel", diffusers.ModelMixin) is diffusers.UNet2DModel
    assert diffusers_class("DDPMScheduler", diffusers.SchedulerMixin) is DDPMScheduler
    for name in ("DDPMPipeline", "UNet2DModel.from_pretrained", "os", 3, "__class__"):
        assert diffusers_class(name, diffusers.ModelMixin) is None


def test_load_model_refuses_a_pipeline_class_and_a_folder_without_weights(tmp_path):
    model = tiny_unet(0)
    model.save_pretrained(tmp_path / "unet")
    loaded = load_model(tmp_path / "unet")
    assert fingerprint_module(loaded) == fingerprint_module(model)
    cfg = json.loads((tmp_path / "unet/config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text(json.dumps({**cfg, "_class_name": "DDPMPipeline"}))
    with pytest.raises(ModelError, match="'DDPMPipeline' is not a diffusers model class"):
        load_model(tmp_path / "bad")
    (tmp_path / "bad/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no weights"):
        weights_format(tmp_path / "bad")
    (tmp_path / "bad/diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.warns(UserWarning, match="pickled .bin"):
        assert weights_format(tmp_path / "bad") is False
    assert weights_format(tmp_path / "unet") is True


def test_load_scheduler_builds_only_scheduler_classes(tmp_path):
    DDIMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "s")
    assert isinstance(load_scheduler(tmp_path / "s"), DDIMScheduler)
    cfg = json.loads((tmp_path / "s/scheduler_config.json").read_text())
    (tmp_path / "s/scheduler_config.json").write_text(
        json.dumps({**cfg, "_class_name": "UNet2DModel"})
    )
    with pytest.raises(ModelError, match="'UNet2DModel' is not a diffusers scheduler class"):
        load_scheduler(tmp_path / "s")
    (tmp_path / "s/scheduler_config.json").write_text(
        json.dumps({**cfg, "_class_name": "FutureSched"})
    )
    assert isinstance(load_scheduler(tmp_path / "s"), DDPMScheduler)  # newer diffusers: DDPM
    with pytest.raises(ModelError, match="no scheduler_config.json"):
        load_scheduler(tmp_path)


def test_fingerprint_is_the_hash_of_every_named_tensor_in_name_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    assert fingerprint_module(model) == h.hexdigest()[:16]
    before = fingerprint_module(model)
    with torch.no_grad():
        model[1].running_mean[0] += 1e-7  # a buffer counts too
    assert fingerprint_module(model) != before


def test_config_record_drops_bookkeeping_and_the_digest_follows_the_schedule_only():
    a = DDPMScheduler(num_train_timesteps=100, clip_sample=True)
    b = DDPMScheduler(num_train_timesteps=100, clip_sample=False)  # sampling only
    c = DDPMScheduler(num_train_timesteps=100, beta_end=0.03)
    d = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    assert noise_schedule_digest(a) == noise_schedule_digest(b)
    assert len({noise_schedule_digest(s) for s in (a, c, d)}) == 3
    rec = config_record(a)
    assert rec["class"] == "DDPMScheduler" and rec["clip_sample"] is True
    assert not [k for k in rec if k.startswith("_")]
    record = checkpoint_config(tiny_unet(0), a)
    assert record["model"]["class"] == "UNet2DModel" and record["scheduler"] == rec
    assert record["noise_schedule"] == noise_schedule_digest(a)
    json.dumps(record)  # plain JSON
