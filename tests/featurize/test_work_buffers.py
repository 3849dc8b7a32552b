"""Featurizing's work buffers (featurize/scratch.py) are held only while batches are featurized:
a build drops them before its fidelity products, search indexes and kernel, a query once its
images are embedded (the demo's peak memory was those buffers, over 300 MB at a batch of 16,
held beside every later stage)."""

from __future__ import annotations

import numpy as np
import pytest

import gradindex as gi
import gradindex.build.write
import gradindex.featurize.fidelity
from gradindex.featurize.scratch import scratch
from gradindex.query_influence import add_factors, embed_influence
from tests.conftest import assert_rows_close, scheduler, tiny_unet

pytestmark = pytest.mark.filterwarnings("ignore:projection fidelity is below the bar")
SPEC = gi.BuildSpec(proj_dim=64, timesteps=3, batch_size=4, checkpoint_weights=(1.0, 2.0))


@pytest.fixture
def build(tmp_path, images, monkeypatch):
    """Build an index of the 7 images over two tiny UNets; {stage: the most scratch bytes held
    when that stage started} and {stage + ' done': ... when it returned} for the rows, the
    fidelity check's sample rows and products, the search indexes and the kernel."""
    held: dict[str, int] = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            held[name] = max(held.get(name, 0), scratch.nbytes())
            out = fn(*args, **kwargs)
            held[f"{name} done"] = max(held.get(f"{name} done", 0), scratch.nbytes())
            return out

        return wrapped

    fidelity, write = gradindex.featurize.fidelity, gradindex.build.write
    stages = (
        (write, "_fill_rows", "rows"),
        (fidelity, "_features", "sample"),
        (fidelity, "_exact_scores", "products"),
        (write, "_search_indexes", "indexes"),
        (write, "write_kernel", "kernel"),
    )
    for module, name, stage in stages:
        monkeypatch.setattr(module, name, spy(stage, getattr(module, name)))
    models = [tiny_unet(1), tiny_unet(2)]
    # room for one checkpoint's [7, 2, p] sample features, not both: the exact check featurizes
    # its sample again (with both, the build keeps them as it featurizes: fidelity_sample.py)
    p = sum(x.numel() for x in models[0].parameters())
    monkeypatch.setattr(fidelity, "FULL_SPACE_BUDGET", 2 * len(images) * p * 4)
    sched = scheduler()
    idx = gi.build_index(
        checkpoints=[(m, sched) for m in models],
        data=images,
        out=tmp_path / "idx",
        spec=SPEC,
        progress=False,
    )
    return idx, held


def test_a_build_holds_no_work_buffers_past_featurizing(build):
    idx, held = build
    assert {"rows done", "sample", "products", "indexes", "kernel"} <= set(held)  # exact fidelity
    assert held["rows done"] > 0
    for stage in ("sample", "products", "indexes", "kernel"):
        assert held[stage] == 0, stage
    assert scratch.nbytes() == 0


def test_the_fidelity_sample_is_featurized_with_half_the_work_buffers(build):
    """Its [S, 2, p] rows are held beside the buffers, so it takes half a batch at a time."""
    _, held = build
    assert 0 < held["sample done"] <= 0.6 * held["rows done"]


def test_a_query_holds_no_work_buffers_once_embedded_and_its_rows_do_not_change(build, images):
    idx, _ = build
    first = idx.embed(images)
    assert scratch.nbytes() == 0
    again = idx.embed(images)  # the buffers allocated again: the same rows, to the bit
    for method in ("tracin", "retrac"):
        np.testing.assert_array_equal(again[method], first[method])
        assert_rows_close(first[method], idx.vectors(method))  # the stored rows


def test_an_influence_query_holds_no_work_buffers_once_embedded(build, images):
    idx, _ = build
    add_factors(idx, images, seed=0)
    rows = embed_influence(idx, images[:3])
    assert rows.shape == (3, idx.dim) and np.isfinite(rows).all()
    assert scratch.nbytes() == 0
