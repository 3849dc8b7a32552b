"""store/records.py: the manifest's records checked against spec, store and checkpoints, on
hand-made manifests (what an edited or moved index looks like)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gradindex.errors import IndexStateError, ModelError
from gradindex.spec import BuildSpec
from gradindex.store.records import (
    check_configs,
    check_fingerprints,
    check_given_sources,
    check_records,
    check_shapes,
    config_changes,
    recorded_checkpoints,
    recorded_scheduler,
    summary,
)

SPEC = BuildSpec(timesteps=4, num_train_timesteps=1000, checkpoint_weights=(0.5, 2.0))
MPATH = Path("idx/manifest.json")


def _manifest(**changes):
    m = {
        "timesteps": [125, 375, 625, 875],  # the centred grid of 4 over 1000
        "checkpoints": [{"weight": 0.5}, {"weight": 2.0}],
        "num_flagged": 1,
    }
    return {**m, **changes}


def test_records_that_follow_from_the_spec_and_the_store_pass():
    check_records(MPATH, _manifest(), SPEC, np.array([False, True, False]))
    weights = [{"weight": 0.5 * (1 + 1e-9)}, {"weight": 2.0}]  # JSON round-off
    check_records(MPATH, _manifest(checkpoints=weights), SPEC, np.array([True]))


@pytest.mark.parametrize(
    "changes, flagged, message",
    [
        ({"timesteps": [125, 375, 625, 876]}, 1, "records timesteps"),
        ({"checkpoints": [{"weight": 0.5}, {"weight": 3.0}]}, 1, "records checkpoint weights"),
        ({}, 2, "records num_flagged 1 but .* say 2"),
        ({"checkpoints": []}, 1, "no readable checkpoint records"),
        ({"checkpoints": ["a", "b"]}, 1, "no readable checkpoint records"),
    ],
)
def test_an_edited_record_is_refused_with_its_key(changes, flagged, message):
    with pytest.raises(IndexStateError, match=message):
        check_records(MPATH, _manifest(**changes), SPEC, np.arange(3) < flagged)


def test_shapes_must_be_the_models():
    check_shapes(MPATH, {"sample_shape": [1, 8, 8]}, (1, 8, 8), (1, 8, 8))  # image = sample
    check_shapes(
        MPATH, {"sample_shape": [4, 8, 8], "image_shape": [3, 64, 64]}, (4, 8, 8), (3, 64, 64)
    )
    with pytest.raises(IndexStateError, match=r"image_shape \[3, 4096, 4096\] but"):
        check_shapes(
            MPATH,
            {"sample_shape": [4, 8, 8], "image_shape": [3, 4096, 4096]},
            (4, 8, 8),
            (3, 64, 64),
        )


def test_recorded_scheduler_only_when_every_checkpoint_used_one_existing_folder(tmp_path):
    sched = tmp_path / "scheduler"
    sched.mkdir()
    assert recorded_scheduler([{"scheduler": str(sched)}, {"scheduler": str(sched)}]) == str(sched)
    assert recorded_scheduler([{"scheduler": str(sched)}, {"scheduler": None}]) is None
    assert recorded_scheduler([{"scheduler": str(tmp_path / "gone")}]) is None
    assert recorded_scheduler([{}]) is None


def test_fingerprints_must_match_and_unrecorded_configs_warn_once():
    ckpts = [
        SimpleNamespace(fingerprint="aa", source="c0"),
        SimpleNamespace(fingerprint="bb", source="c1"),
    ]
    records = [{"fingerprint": "aa"}, {"fingerprint": "bb"}]
    with pytest.warns(UserWarning, match="before checkpoint configs were recorded"):
        check_fingerprints(ckpts, records, "why")
    records[1]["fingerprint"] = "cc"
    with pytest.raises(ModelError, match="checkpoint 1 \\(c1\\) has fingerprint bb but .* cc: why"):
        check_fingerprints(ckpts, records, "why")


def test_config_changes_name_the_keys_that_differ():
    recorded = {"model": {"a": 1, "b": [1, 2], "only_old": 0}, "noise_schedule": "x1"}
    same = {"model": {"a": 1, "b": [1, 2], "only_new": 5}, "noise_schedule": "x1", "scheduler": {}}
    assert config_changes(recorded, same) == []
    recorded["scheduler"] = {"beta_end": 0.02}
    now = {
        "model": {"a": 2, "b": [1, 3]},
        "noise_schedule": "x2",
        "scheduler": {"beta_end": 0.012},
    }
    assert config_changes(recorded, now) == [
        "its model config changed (a: 1 -> 2, b: [1, 2] -> [1, 3])",
        "its noise schedule changed (scheduler config: beta_end: 0.02 -> 0.012)",
    ]


def test_recorded_checkpoints_say_what_to_pass_before_loading_anything(tmp_path):
    memory = {"checkpoints": [{"source": "memory:0"}], "spec": {}}
    with pytest.raises(ModelError, match="built from in-memory models"):
        recorded_checkpoints(memory, None, None, None)
    gone = {"checkpoints": [{"source": str(tmp_path / "ckpt-1")}], "spec": {}}
    with pytest.raises(ModelError, match="checkpoint 0 of the index, .*ckpt-1, is gone"):
        recorded_checkpoints(gone, None, None, None)
    with pytest.raises(ModelError, match="has 1 checkpoints but 2 were given"):
        recorded_checkpoints(gone, ["a", "b"], None, None)


def test_summary_keeps_the_records_and_fills_none_for_older_builds():
    m = {
        "num_rows": 7, "dim": 8, "proj_dim": 4, "num_params": 100, "checkpoints": [{}],
        "timesteps": [1], "prediction_type": "epsilon", "spec": {}, "indexes": {},
        "versions": {}, "kernel": {"rows": 7},
    }  # fmt: skip
    s = summary(Path("p"), m, {"labels": None})
    assert s["num_rows"] == 7 and s["num_flagged"] == 0 and s["kernel"] == {"rows": 7}
    assert s["fidelity"] is None and s["factors"] is None and s["path"] == "p"
    assert s["conditioning"] == {"labels": None}


def test_a_weight_edited_by_a_few_percent_is_refused():
    # 0.5 -> 0.51: 2% off, far beyond JSON round-off (rtol 1e-6)
    with pytest.raises(IndexStateError, match="records checkpoint weights"):
        check_records(
            MPATH,
            _manifest(checkpoints=[{"weight": 0.51}, {"weight": 2.0}]),
            SPEC,
            np.arange(3) < 1,
        )


@pytest.mark.parametrize("given", [["a"], ["a", "b", "c"]])
def test_checkpoints_given_must_be_one_per_recorded_checkpoint(given):
    manifest = {"checkpoints": [{"source": "x"}, {"source": "y"}]}
    with pytest.raises(
        ModelError, match=f"the index has 2 checkpoints but {len(given)} were given"
    ):
        check_given_sources(manifest, given)


def test_one_record_without_a_config_skips_the_config_check_with_a_warning():
    # an index whose first checkpoint record predates configs: nothing to compare against
    ckpts = [SimpleNamespace(model=None, scheduler=None)] * 2
    records = [{"config": None}, {"config": {"model": {}, "noise_schedule": "x"}}]
    with pytest.warns(UserWarning, match="built before checkpoint configs were recorded"):
        check_configs(ckpts, records)
