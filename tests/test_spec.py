"""BuildSpec: validation messages, exact JSON round-trip, fingerprint, draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradindex as gi
from gradindex.spec import draw_seed


def test_json_round_trip_is_exact():
    spec = gi.BuildSpec(
        proj_dim=512,
        projection="gaussian",
        timesteps=(5, 50, 500),
        noise_draws=3,
        seed=4,
        loss="l1",
        params=("up_blocks.*", "mid_block.*"),
        checkpoint_weights=(0.1, 0.3),
        store_dtype="float16",
        data_range=(0.0, 16.0),
        num_train_timesteps=1000,
    )
    again = gi.BuildSpec.from_json(spec.to_json())
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()
    assert isinstance(again.timesteps, tuple) and isinstance(again.data_range[0], float)
    assert json.loads(spec.to_json()) == spec.to_dict()


def test_fingerprint_changes_with_any_field():
    base = gi.BuildSpec()
    assert base.fingerprint() != base.replace(seed=1).fingerprint()
    assert base.fingerprint() != base.replace(timesteps=11).fingerprint()
    assert base.diff(base.replace(loss="l1")) == {"loss": ("mse", "l1")}


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(proj_dim=0), "proj_dim"),
        (dict(projection="pca"), "projection"),
        (dict(timesteps=0), "timesteps"),
        (dict(timesteps=(1, -2)), "timesteps"),
        (dict(noise_draws=0), "noise_draws"),
        (dict(loss="huber"), "loss"),
        (dict(checkpoint_weights=(1.0, -1.0)), "checkpoint_weights"),
        (dict(batch_size=0), "batch_size"),
        (dict(store_dtype="int8"), "store_dtype"),
        (dict(data_range=(1.0, 0.0)), "data_range"),
        (dict(proj_dim=1000, sjlt_nnz=3), "proj_dim"),
        (dict(timesteps=(10, 1000), num_train_timesteps=1000), "timesteps"),
        (dict(params=()), "params"),
        (dict(timesteps=(-1,)), "timesteps"),
        (dict(timesteps=()), "timesteps"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(data_range=(1.0, 1.0)), "data_range"),
        (dict(data_range=(0.0, float("inf"))), "data_range"),
        (dict(snr_weighting="min_snr", snr_gamma=0.0), "snr_gamma"),
        (dict(resolution=32, center_crop="yes"), "center_crop"),
        (dict(precondition="adam", projection="kronecker-sjlt"), "precondition"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(gi.SpecError) as err:
        gi.BuildSpec(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"BuildSpec.{field}=") and "\n" not in msg


def test_unknown_field_in_json():
    with pytest.raises(gi.SpecError, match="unknown BuildSpec field"):
        gi.BuildSpec.from_json('{"proj_dims": 3}')


def test_draws_are_the_same_for_every_call_and_depend_only_on_seed_k_m():
    spec = gi.BuildSpec(timesteps=4, noise_draws=2, num_train_timesteps=1000, seed=3)
    a, b = spec.draws((1, 8, 8)), spec.draws((1, 8, 8))
    assert [t for t, _ in a] == [125, 125, 375, 375, 625, 625, 875, 875]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    # draw (k, m) is a standard normal from a generator seeded by (seed, k, m) only
    k, m = 2, 1
    expected = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(draw_seed(3, k, m)))
    assert torch.equal(a[k * 2 + m][1], expected)
    # a different K keeps draw (k, m) of the earlier timesteps' noise identical
    other = gi.BuildSpec(timesteps=5, noise_draws=2, num_train_timesteps=1000, seed=3).draws(
        (1, 8, 8)
    )
    assert torch.equal(other[0][1], a[0][1])
    assert not torch.equal(a[0][1], a[1][1])


def test_draws_need_the_training_range():
    with pytest.raises(gi.SpecError, match="num_train_timesteps"):
        gi.BuildSpec(timesteps=3).draws((1, 4, 4))


def test_weights_count_must_match_checkpoints():
    with pytest.raises(gi.SpecError, match="one weight per checkpoint"):
        gi.BuildSpec(checkpoint_weights=(1.0, 2.0)).weights(3)


def test_batch_size_is_not_part_of_the_identity():
    """It changes how rows are computed, not what they are: same fingerprint, no diff."""
    base = gi.BuildSpec(timesteps=3)
    other = base.replace(batch_size=2)
    assert other.fingerprint() == base.fingerprint()
    assert "batch_size" not in other.identity() and other.identity() == base.identity()
    assert base.replace(proj_seed=1).fingerprint() != base.fingerprint()
    assert other.to_dict()["batch_size"] == 2  # still recorded


def test_fingerprints_include_the_one_older_indexes_recorded():
    """Indexes built before batch_size left the identity recorded sha256 of the whole spec."""
    import hashlib

    spec = gi.BuildSpec(proj_dim=64, batch_size=3)
    old = hashlib.sha256(spec.to_json().encode()).hexdigest()[:16]
    assert spec.fingerprints() == (spec.fingerprint(), old)
    assert spec.fingerprint() != old


def test_field_checks_take_integers_and_finite_numbers_only():
    """spec_checks: a bool is not an int (True would pass as 1), NaN / inf are not numbers."""
    from gradindex.spec_checks import is_int, is_number

    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_number(0.5) and is_number(np.float32(2)) and is_number(4)
    assert not is_number(float("nan")) and not is_number(float("inf")) and not is_number(False)
    with pytest.raises(gi.SpecError, match="timesteps"):
        gi.BuildSpec(timesteps=True)


def test_a_timestep_count_may_take_the_whole_training_range():
    assert len(gi.BuildSpec(timesteps=1000, num_train_timesteps=1000).timestep_values()) == 1000


def test_the_older_fingerprint_of_a_float32_spec_leaves_precision_out():
    """Indexes built before 'auto' hashed the whole spec without precision (float32 omitted)."""
    import hashlib
    import json

    spec = gi.BuildSpec(proj_dim=64, batch_size=3, projection="sjlt", precision="float32")
    stored = json.loads(spec.to_json())
    del stored["precision"]  # as session 11 wrote it
    old = hashlib.sha256(json.dumps(stored, sort_keys=True, indent=2).encode()).hexdigest()[:16]
    assert spec.fingerprints()[1] == old


def test_diff_names_a_field_left_out_at_its_old_default():
    """A reopened index whose spec differs in a field omitted at its default is told which."""
    base = gi.BuildSpec(projection="sjlt")
    assert base.diff(base.replace(precondition="adam")) == {"precondition": ("none", "adam")}
    assert base.replace(noise_offset=0.1).diff(base) == {"noise_offset": (0.1, 0.0)}
