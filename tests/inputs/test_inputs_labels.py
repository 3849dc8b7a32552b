"""inputs/labels.py on its own: what a UNet is conditioned on (from its diffusers config), the
.npz columns a model kind reads, and labels / prompts checked one per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from gradindex.errors import DataError, ModelError
from gradindex.inputs.labels import (
    as_labels,
    as_prompts,
    conditioning_kind,
    npz_columns,
    npz_conditioning,
)
from tests.conftest import tiny_unet


def test_conditioning_kind_follows_the_config():
    assert conditioning_kind(tiny_unet(0)) == "none"
    assert conditioning_kind(tiny_unet(0, num_class_embeds=3)) == "class"
    text = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    assert conditioning_kind(text) == "text"
    timestep_classes = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        norm_num_groups=4, layers_per_block=1, class_embed_type="timestep",
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    with pytest.raises(ModelError, match="class_embed_type='timestep' is not supported"):
        conditioning_kind(timestep_classes)


def test_npz_columns_by_kind_and_given_values_win():
    assert npz_columns("class") == ("labels",)
    assert npz_columns("text") == ("captions",)
    assert npz_columns("none") == ()
    assert npz_columns("class", labels=[0, 1]) == ()  # given labels: the file's not read
    labels, prompts = npz_conditioning({"captions": np.array(["a", "b"])})
    assert labels is None and prompts == ["a", "b"]


def test_labels_are_one_integer_per_image():
    np.testing.assert_array_equal(as_labels(2, 3), [2, 2, 2])
    np.testing.assert_array_equal(as_labels(torch.tensor([1.0, 0.0]), 2), [1, 0])
    assert as_labels(np.array([1, 2], np.uint8), 2).dtype == np.int64
    with pytest.raises(DataError, match=r"labels have shape \(3,\) but there are 2 images"):
        as_labels([0, 1, 2], 2)
    with pytest.raises(DataError, match="class labels must be integers"):
        as_labels([0.5, 1.0], 2)


def test_prompts_are_one_string_per_image():
    assert as_prompts("a cat", 2) == ["a cat", "a cat"]
    assert as_prompts(np.array(["x", "y"]), 2) == ["x", "y"]
    with pytest.raises(DataError, match="3 prompts for 2 images"):
        as_prompts(["a", "b", "c"], 2)
    with pytest.raises(DataError, match="list of strings"):
        as_prompts([1, 2], 2)
