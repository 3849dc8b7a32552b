"""build/state.py: the folder states a build meets (new, unfinished, finished, foreign) and what
it does with each; the settings a resume compares; failed writes named. Hand-made folders."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from gradindex.build.state import (
    is_write_failure,
    prepare_folder,
    settings_diffs,
    write_errno,
    write_error,
    write_reason,
)
from gradindex.errors import IndexStateError, WriteError
from gradindex.spec import BuildSpec
from gradindex.store.layout import BUILD_STATE, MANIFEST, VECTORS
from gradindex.store.lifecycle import staging_path


def _state(**spec_changes):
    return {
        "spec": BuildSpec(proj_dim=16, **spec_changes).to_dict(),
        "checkpoints": ["fp0", "fp1"],
        "num_rows": 9,
        "format_version": 1,
    }


def test_a_new_folder_gets_the_build_state_and_is_written(tmp_path):
    out = tmp_path / "new"
    assert prepare_folder(out, _state(), resume=False, overwrite=False) == out
    assert json.loads((out / BUILD_STATE).read_text()) == _state()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_folder(empty, _state(), resume=False, overwrite=False) == empty


def test_an_unfinished_build_is_resumed_only_with_its_own_settings(tmp_path):
    out = tmp_path / "idx"
    prepare_folder(out, _state(), resume=False, overwrite=False)
    with pytest.raises(IndexStateError, match="unfinished build; pass --resume"):
        prepare_folder(out, _state(), resume=False, overwrite=False)
    assert prepare_folder(out, _state(batch_size=4), resume=True, overwrite=False) == out
    with pytest.raises(IndexStateError, match=r"different settings \(spec.proj_seed\)"):
        prepare_folder(out, _state(proj_seed=3), resume=True, overwrite=False)


def test_a_finished_index_is_kept_skipped_or_replaced_through_a_staging_folder(tmp_path):
    out = tmp_path / "idx"
    out.mkdir()
    manifest = {**_state(), "checkpoints": [{"fingerprint": "fp0"}, {"fingerprint": "fp1"}]}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexStateError, match="already holds a finished index; pass --overwrite"):
        prepare_folder(out, _state(), resume=False, overwrite=False)
    assert prepare_folder(out, _state(), resume=True, overwrite=False) is None  # done already
    other = {**_state(), "checkpoints": ["fp0", "fpX"]}
    with pytest.raises(IndexStateError, match=r"different settings \(checkpoints\)"):
        prepare_folder(out, other, resume=True, overwrite=False)
    stage = prepare_folder(out, _state(), resume=False, overwrite=True)
    assert stage == staging_path(out) and (stage / BUILD_STATE).exists()
    assert (out / MANIFEST).exists()  # the finished index stays until the new one is complete
    assert prepare_folder(out, _state(), resume=True, overwrite=True) == stage  # a killed one's


@pytest.mark.parametrize(
    "content, overwrite, message",
    [
        ({"notes.txt": "x"}, False, "not empty and holds no index"),
        ({"notes.txt": "x"}, True, "not an index folder; refusing to overwrite"),
        ({VECTORS: "x"}, False, "manifest"),
    ],
)
def test_someone_elses_folder_is_refused(tmp_path, content, overwrite, message):
    out = tmp_path / "idx"
    out.mkdir()
    for name, text in content.items():
        (out / name).write_text(text)
    with pytest.raises(IndexStateError, match=message):
        prepare_folder(out, _state(), resume=False, overwrite=overwrite)
    assert {p.name for p in out.iterdir()} == set(content)  # nothing written there


def test_a_file_as_out_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(IndexStateError, match="exists and is not a folder"):
        prepare_folder(tmp_path / "f", _state(), resume=False, overwrite=False)


def test_settings_diffs_ignore_the_batch_size_and_defaults_left_out():
    old = _state()
    assert settings_diffs(old, _state(batch_size=3)) == []
    old["spec"].pop("precondition", None)  # written before the field existed: its default
    assert settings_diffs(old, _state()) == []
    new = {**_state(proj_seed=2, timesteps=3), "num_rows": 10, "shard": {"index": 0}}
    assert settings_diffs(old, new) == ["spec.proj_seed", "spec.timesteps", "num_rows", "shard"]


def test_failed_writes_are_named_with_the_os_reason():
    full = OSError(errno.ENOSPC, "No space left on device")
    h5 = RuntimeError("Can't flush: file write failed: time = x, errno = 28, error message")
    assert write_errno(full) == errno.ENOSPC and write_errno(h5) == 28
    assert write_reason(full) == "disk full"
    assert write_reason(h5) == "disk full"
    assert write_reason(OSError(errno.EACCES, "x")) == "Permission denied"
    assert is_write_failure(full) and is_write_failure(h5) and is_write_failure(WriteError("w"))
    assert not is_write_failure(RuntimeError("shape mismatch in featurize"))
    err = write_error(Path("out"), full, staged=True)
    assert isinstance(err, WriteError) and str(err).startswith("out: writing failed (disk full)")
    assert "--overwrite --resume" in str(err)
