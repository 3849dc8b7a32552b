"""CLI: build / query / info work end to end, and bad input gets one 'Error:' line, exit 1,
and no index folder that looks complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main

SPEC = ["--proj-dim", "64", "--timesteps", "2", "--batch-size", "4"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def data_file(tmp_path, images):
    path = tmp_path / "train.npy"
    np.save(path, images)
    return path


@pytest.fixture
def built_dir(tmp_path, data_file, saved_checkpoints):
    out = tmp_path / "idx"
    ckpt_args = [a for c in saved_checkpoints for a in ("-c", c)]
    res = run(
        "build", *ckpt_args, "--data", data_file, "--out", out, *SPEC, "--checkpoint-weights", "1,2"
    )
    assert res.exit_code == 0, res.output
    return out


def test_build_info_query(built_dir, data_file):
    res = run("info", built_dir, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["num_rows"] == 7 and info["dim"] == 128
    assert [c["weight"] for c in info["checkpoints"]] == [1.0, 2.0]
    res = run("query", built_dir, data_file, "-k", "3", "--method", "both", "--json")
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.output.splitlines()]
    assert len(records) == 14 and {r["method"] for r in records} == {"tracin", "retrac"}
    retrac = [r for r in records if r["method"] == "retrac"]
    assert [r["ids"][0] for r in retrac] == list(range(7))  # each training image finds itself
    res = run("info", built_dir)
    assert res.exit_code == 0 and "rows         7" in res.output


def _error_line(res):
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code != 0, res.output
    assert len(lines) == 1, res.output
    return lines[0]


def _bad_data(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


BAD_BUILD = [
    (
        "wrong channels",
        lambda d: _bad_data(d, "rgb.npy", np.zeros((3, 3, 8, 8), np.float32)),
        "channel",
    ),
    ("wrong ndim", lambda d: _bad_data(d, "flat.npy", np.zeros((3, 64), np.float32)), "shape"),
    ("empty", lambda d: _bad_data(d, "empty.npy", np.zeros((0, 1, 8, 8), np.float32)), "empty"),
    ("nan", lambda d: _bad_data(d, "nan.npy", np.full((2, 1, 8, 8), np.nan, np.float32)), "NaN"),
    ("missing", lambda d: d / "missing.npy", "no such file"),
    ("strings", lambda d: _bad_data(d, "s.npy", np.array([["a"]])), "dtype"),
]


@pytest.mark.parametrize("name,make,needle", BAD_BUILD, ids=[b[0] for b in BAD_BUILD])
def test_bad_build_input(tmp_path, saved_checkpoints, name, make, needle):
    out = tmp_path / "out"
    res = run("build", "-c", saved_checkpoints[0], "--data", make(tmp_path), "--out", out, *SPEC)
    assert needle in _error_line(res)
    assert not (out / "manifest.json").exists()


def test_bad_build_options(tmp_path, saved_checkpoints, data_file):
    out = tmp_path / "out"
    res = run(
        "build", "-c", saved_checkpoints[0], "--data", data_file, "--out", out, "--proj-dim", "-3"
    )
    assert "BuildSpec.proj_dim=-3" in _error_line(res)
    res = run("build", "-c", tmp_path / "nockpt", "--data", data_file, "--out", out, *SPEC)
    assert "no such checkpoint folder" in _error_line(res)
    res = run(
        "build",
        "-c",
        saved_checkpoints[0],
        "--data",
        data_file,
        "--out",
        out,
        *SPEC,
        "--checkpoint-weights",
        "1,2",
    )
    assert "one weight per checkpoint" in _error_line(res)
    assert not (out / "manifest.json").exists()


def test_rebuild_is_refused_without_overwrite(built_dir, saved_checkpoints, data_file):
    res = run("build", "-c", saved_checkpoints[0], "--data", data_file, "--out", built_dir, *SPEC)
    assert "--overwrite" in _error_line(res)


def test_bad_query_input(tmp_path, built_dir, data_file):
    assert "k=0" in _error_line(run("query", built_dir, data_file, "-k", "0"))
    assert "no such index folder" in _error_line(run("query", tmp_path / "none", data_file))
    rgb = _bad_data(tmp_path, "rgb.npy", np.zeros((2, 3, 8, 8), np.float32))
    assert "channel" in _error_line(run("query", built_dir, rgb))
    big = _bad_data(tmp_path, "big.npy", np.full((2, 1, 8, 8), 40.0, np.float32))
    assert "not [0, 1] or [-1, 1]" in _error_line(run("query", built_dir, big))
    res = run("query", built_dir, data_file, "--method", "cosine")
    assert res.exit_code == 2 and "cosine" in res.output
    (built_dir / "manifest.json").unlink()
    assert "incomplete index" in _error_line(run("query", built_dir, data_file))


def test_k_larger_than_index_is_clamped_with_a_warning(built_dir, data_file):
    res = run("query", built_dir, data_file, "-k", "50", "--method", "tracin", "--json")
    assert res.exit_code == 0
    assert "Warning: k=50 exceeds the 7 indexed samples" in res.output
    first = json.loads([ln for ln in res.output.splitlines() if ln.startswith("{")][0])
    assert len(first["ids"]) == 7


def test_bulk_query_from_vectors_to_files(tmp_path, built_dir):
    import gradindex as gi

    idx = gi.AttributionIndex.open(built_dir)
    vec_file = tmp_path / "q.npz"
    np.savez(vec_file, tracin=idx.vectors("tracin")[:5], retrac=idx.vectors("retrac")[:5])
    out = tmp_path / "res.npz"
    res = run("query", built_dir, vec_file, "--vectors", "-k", "2", "--output", out)
    assert res.exit_code == 0, res.output
    with np.load(out) as z:
        assert z["retrac_rows"].shape == (5, 2)
        np.testing.assert_array_equal(z["retrac_rows"][:, 0], np.arange(5))
        brute = np.argsort(-(idx.vectors("tracin")[:5] @ idx.vectors("tracin").T), axis=1)[:, :2]
        np.testing.assert_array_equal(z["tracin_rows"], brute)
    jsonl = tmp_path / "res.jsonl"
    res = run(
        "query",
        built_dir,
        vec_file,
        "--vectors",
        "-k",
        "2",
        "--output",
        jsonl,
        "--method",
        "retrac",
    )
    assert res.exit_code == 0, res.output
    assert len(jsonl.read_text().splitlines()) == 5
    assert (
        "must end in .jsonl or .npz"
        in run("query", built_dir, vec_file, "--vectors", "-o", tmp_path / "x.txt").output
    )


def test_report_command(tmp_path, built_dir):
    res = run("report", built_dir, "-k", "2", "--figures", tmp_path / "fig")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert isinstance(out, dict) and out
    assert any((tmp_path / "fig").glob("*.png"))
