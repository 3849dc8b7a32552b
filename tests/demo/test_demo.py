"""The demo pipeline runs end to end at tiny settings and writes what it claims."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gradindex.cli.main import main
from gradindex.demo.run import DemoSettings, run_demo
from gradindex.demo.sampling import sample_images
from gradindex.query import AttributionIndex


@pytest.mark.slow
def test_quick_demo_writes_pictures_and_summary(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick"])
    assert res.exit_code == 0, res.output
    assert "distinct training images" in res.output
    summary = json.loads((out / "summary.json").read_text())
    s = DemoSettings.quick()
    assert summary["num_train"] == s.num_train and summary["k"] == s.k
    assert len(summary["checkpoints"]) == 3
    # the methods the demo index serves: no 'influence' column (it has no factors; that column
    # was TracIn's answer under another name)
    assert set(summary["distinct_in_topk"]) == {"tracin", "retrac", "trak", "retrak"}
    for m in ("trak", "retrak"):  # a column per method in the picture; kernel ones in range
        assert 1 <= summary["distinct_in_topk"][m] <= min(s.num_train, s.num_queries * s.k)
    # the distinct training images the stored methods returned, recounted by brute force: the
    # same generated queries (same seed), embedded, against every stored row with numpy
    queries = sample_images(
        out / "model", s.num_queries, seed=s.seed + 1, num_inference_steps=s.sample_steps
    )
    idx = AttributionIndex.open(out / "index")
    vecs = idx.embed(queries)
    for m in ("tracin", "retrac"):
        scores = vecs[m].astype(np.float64) @ idx.vectors(m).astype(np.float64).T  # [Q, N]
        top = np.argsort(-scores, axis=1, kind="stable")[:, : s.k]
        assert summary["distinct_in_topk"][m] == len(np.unique(top)), m
    for name in ("attribution.png", "timestep_norms.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
            assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas
    # a second run reuses the trained model and the finished index (neither is rewritten)
    stamps = [
        (out / p).stat().st_mtime_ns for p in ("model/train_config.json", "index/manifest.json")
    ]
    again = run_demo(out, s, progress=False)
    assert stamps == [
        (out / p).stat().st_mtime_ns for p in ("model/train_config.json", "index/manifest.json")
    ]
    assert again["distinct_in_topk"] == summary["distinct_in_topk"]
