"""inputs/runs.py: which weights each folder of a diffusers training run holds, on hand-made
run layouts (config.json files only: nothing is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradindex.errors import ModelError
from gradindex.inputs.runs import is_ema_run, model_folder, scheduler_folders, weights_kind


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def runs(tmp_path):
    """Two runs as the trainers leave them: 'plain' (no EMA) and 'ema' (--use_ema)."""
    for name, ema in (("plain", False), ("ema", True)):
        out = tmp_path / name
        for step in (100, 200):
            ckpt = out / f"checkpoint-{step}"
            _model(ckpt / "unet")
            (ckpt / "optimizer.bin").write_bytes(b"")
            if ema:
                _model(ckpt / "unet_ema")
        _model(out / "unet")  # the final pipeline save (EMA weights in an EMA run)
        (out / "scheduler").mkdir()
    _model(tmp_path / "loose")  # a model folder of no run
    return tmp_path


def test_default_choice_names_the_kind_each_folder_holds(runs):
    assert weights_kind(runs / "plain/checkpoint-100") == (
        runs / "plain/checkpoint-100/unet",
        "raw",
    )
    assert weights_kind(runs / "plain") == (runs / "plain/unet", "raw")
    assert weights_kind(runs / "ema/checkpoint-100") == (runs / "ema/checkpoint-100/unet", "raw")
    assert weights_kind(runs / "ema/checkpoint-100/unet_ema") == (
        runs / "ema/checkpoint-100/unet_ema",
        "ema",
    )
    assert weights_kind(runs / "ema") == (runs / "ema/unet", "ema")  # final save of an EMA run
    assert weights_kind(runs / "ema/unet") == (runs / "ema/unet", "ema")
    assert weights_kind(runs / "loose") == (runs / "loose", None)
    assert is_ema_run(runs / "ema") and not is_ema_run(runs / "plain")


def test_asked_weights_pick_the_folder_or_refuse_the_other_kind(runs):
    ck = runs / "ema/checkpoint-200"
    assert model_folder(ck, "ema") == (ck / "unet_ema", "ema")
    assert model_folder(ck, "raw") == (ck / "unet", "raw")
    assert model_folder(runs / "ema", "ema") == (runs / "ema/unet", "ema")
    assert model_folder(runs / "loose", "raw") == (runs / "loose", None)  # cannot tell: as is
    with pytest.raises(ModelError, match="final save of an EMA run"):
        model_folder(runs / "ema", "raw")
    with pytest.raises(ModelError, match="raw weights only .* --use_ema"):
        model_folder(runs / "plain/checkpoint-100", "ema")
    with pytest.raises(ModelError, match="raw weights of an EMA checkpoint"):
        model_folder(ck / "unet", "ema")
    with pytest.raises(ModelError, match="holds EMA weights"):
        model_folder(ck / "unet_ema", "raw")
    with pytest.raises(ModelError, match="weights='best': use one of raw, ema"):
        model_folder(ck, "best")
    assert model_folder(ck, None) == weights_kind(ck)  # older indexes: unchecked


def test_scheduler_folders_nearest_first(runs):
    ck = runs / "plain/checkpoint-100"
    assert scheduler_folders(ck) == [ck / "scheduler", runs / "plain/scheduler"]
    assert scheduler_folders(ck / "unet") == [
        ck / "unet/scheduler",
        ck / "scheduler",
        runs / "plain/scheduler",
    ]
