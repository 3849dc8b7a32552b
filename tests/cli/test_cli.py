"""CLI: build / query / info work end to end, and bad input gets one 'Error:' line, exit 1,
and no index folder that looks complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli.main import main
from tests.conftest import run

SPEC = ["--proj-dim", "64", "--timesteps", "2", "--batch-size", "4"]


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
    assert "holds an index's files but no manifest.json (deleted?)" in _error_line(
        run("query", built_dir, data_file)
    )


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
    res = run("query", built_dir, vec_file, "--vectors", "-o", tmp_path / "x.txt")
    assert res.exit_code == 1 and "give a .jsonl (one JSON record" in _error_line(res)


def test_report_command(tmp_path, built_dir):
    res = run("report", built_dir, "-k", "2", "--figures", tmp_path / "fig", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert isinstance(out, dict) and out["k"] == 2
    assert any((tmp_path / "fig").glob("*.png"))


def _manifest(index_dir):
    return json.loads((index_dir / "manifest.json").read_text())


def _expected_info(index_dir, saved_checkpoints):
    """The summary lines of the tiny index: every number here is a fact of the build (7 images,
    2 checkpoints x 64 dims, weights 1 and 2, a 2-step grid over 1000 timesteps), not output."""
    import h5py

    from tests.conftest import tiny_unet

    params = sum(p.numel() for p in tiny_unet(1).parameters())
    ckpts = _manifest(index_dir)["checkpoints"]
    assert [c["source"] for c in ckpts] == [str(p) for p in saved_checkpoints]
    lams = {}  # λ_c = 3 (trace(G_c) - top eigenvalue) / d, G_c = XᵀX / w_c
    with h5py.File(index_dir / "vectors.h5", "r") as f:
        for rows in ("tracin", "retrac"):
            x = f[rows][()].astype(np.float64).reshape(7, 2, 64)
            grams = [x[:, c].T @ x[:, c] / w for c, w in enumerate((1, 2))]
            lams[rows] = [3 * (np.trace(g) - np.linalg.eigvalsh(g)[-1]) / 64 for g in grams]
    return [
        f"index        {index_dir}",
        "rows         7 (0 flagged, left out of search)",
        "dim          128 = 2 checkpoint(s) x 64",
        f"params       {params:,} (sjlt projection, seed 0)",
        # 'auto' decided, and why: a batch of 16's float32 per-item gradients and two feature
        # rows per item, 48 floats per parameter, within 1 GiB
        f"auto         projection sjlt, precision float32, norms exact ({params:,} parameters x "
        f"batch 16: {4 * params * 48 / 2**30:.2g} GiB of per-item gradients per batch, within "
        "the 1 GiB line)",
        "draws        2 timesteps x 1 noise draw (seed 0), loss mse",
        "timesteps    250, 750",
        "model        predicts epsilon, data range [0, 1], rows stored as float32, computed in float32",
        f"checkpoint   {saved_checkpoints[0]}  w=1  {ckpts[0]['fingerprint']}",
        f"checkpoint   {saved_checkpoints[1]}  w=2  {ckpts[1]['fingerprint']}",
        "weights      raw (what the optimizer stepped) for every checkpoint of the run",
        "fidelity     not measured (fidelity_sample=0)",
        "search       tracin: flat (exact)",
        "search       retrac: flat (exact)",
        "kernel       factors of 7 rows: trak rank 7 (exact), retrak rank 7 (exact); "
        f"trak lambda {lams['tracin'][0]:.4g}, {lams['tracin'][1]:.4g}; "
        f"retrak lambda {lams['retrac'][0]:.4g}, {lams['retrac'][1]:.4g} "
        "(lambda_c = 3.0 * (trace(G_c) - top eigenvalue) / d)",
        "kernel search trak: recall@10 1.000 (target 0.95), exact search; "
        "retrak: recall@10 1.000 (target 0.95), exact search",
        f"factors      none; add them for --method influence with: gradindex factors {index_dir} "
        "--data TRAINING_DATA",
    ]


def test_build_and_info_print_a_readable_summary(tmp_path, data_file, saved_checkpoints):
    """build and info print aligned lines, no raw JSON and no thread count; --json prints the
    info dict."""
    import re

    out = tmp_path / "idx"
    ckpt_args = [a for c in saved_checkpoints for a in ("-c", c)]
    res = CliRunner().invoke(
        main,
        [str(a) for a in ("build", *ckpt_args, "-d", data_file, "-o", out, *SPEC)]
        + ["--checkpoint-weights", "1,2", "--fidelity-sample", "0"],
    )
    assert res.exit_code == 0, res.output
    expected = _expected_info(out, saved_checkpoints)
    for printed in (res.stdout, run("info", out).stdout):
        lines = printed.splitlines()
        assert lines[: len(expected)] == expected
        assert len(lines) == len(expected) + 2
        assert re.fullmatch(r"built        in [0-9.]+ s by gradindex \S+", lines[-2]), lines[-2]
        took = r"read in [0-9.e-]+ s beside featurizing \([0-9.e-]+ s\), which waited [0-9.e-]+ s"
        assert re.fullmatch(rf"data         {took} for it", lines[-1]), lines[-1]
        assert "{" not in printed and "threads" not in printed
    info = json.loads(run("info", out, "--json").stdout)
    assert info["num_rows"] == 7 and set(info["indexes"]) == {"tracin", "retrac"}
    assert set(info["data_seconds"]) == {"reading_s", "waiting_s", "featurizing_s"}


def test_info_summary_shows_keys_it_does_not_know(built_dir):
    """A key added to AttributionIndex.info() later still shows, one line, nested keys
    dotted."""
    import gradindex as gi
    from gradindex.store.describe import format_info

    info = gi.AttributionIndex.open(built_dir).info()
    info["audit"] = {"rows": 48, "tracin": {"top10_overlap": 0.833333, "ok": False}}
    lines = format_info(info)
    assert lines[-1] == "audit        rows 48, tracin.top10_overlap 0.8333, tracin.ok no"


def test_report_prints_a_summary_of_its_json(built_dir):
    """The default output: the key diagnostics, each explained, with the numbers of --json
    (read back from the printed table). Default k=10 on a 7-row index: lists of the 6 others."""
    res = run("report", built_dir)
    assert res.exit_code == 0, res.output
    data = json.loads(run("report", built_dir, "--json").stdout)
    lines = res.stdout.splitlines()
    assert lines[:2] == [
        f"index {built_dir}: 7 rows (0 flagged)",
        "queries 7 training rows (self excluded), top 6 each",
    ]
    nbt = data["norm_by_timestep"]
    head = lines.index("  timestep        p10     median        p90  p90/p10")
    for i, t in enumerate(nbt["timesteps"]):
        got = [float(v) for v in lines[head + 1 + i].split()]
        want = [t, nbt["p10"][i], nbt["median"][i], nbt["p90"][i]]
        np.testing.assert_allclose(got[:4], want, rtol=5e-4)
        assert got[4] == pytest.approx(nbt["within_timestep_p90_over_p10"][i], rel=5e-3)
    assert lines[head + 3].startswith(
        f"  medians differ {nbt['median_max_over_min']:.3g}x across timesteps (largest at t="
    )
    m = data["methods"]
    distinct = next(ln for ln in lines if ln.startswith("  distinct rows"))
    assert distinct.split()[2:4] == [
        str(m["tracin"]["concentration"]["distinct"]),
        str(m["retrac"]["concentration"]["distinct"]),
    ]
    assert distinct.endswith(
        "training rows among all 42 results (more = answers depend on the query)"
    )
    self_line = next(ln for ln in lines if ln.startswith("  self rank 1"))
    assert [float(v) for v in self_line.split()[3:5]] == [
        m["tracin"]["self_retrieval"]["rank1"],
        m["retrac"]["self_retrieval"]["rank1"],
    ]
    assert "{" not in res.stdout


def test_help_loads_no_model_search_or_store_code():
    """Commands import their stage when they run: `python -m gradindex.cli --help` (the
    torchrun entry) lists every command without loading diffusers, FAISS or h5py."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import runpy, sys\n"
        "sys.argv = ['gradindex', '--help']\n"
        "try:\n"
        "    runpy.run_module('gradindex.cli', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'faiss', 'h5py'}))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    *help_text, loaded = out.stdout.splitlines()
    listed = [ln.split()[0] for ln in help_text[help_text.index("Commands:") + 1 :] if ln.strip()]
    assert " ".join(listed) == "add build demo export factors info kernel merge query report serve"
    assert loaded == "[]"
