"""gradindex.store.vectors: what lands on disk, read back with plain h5py (not the store's own reader)."""

from __future__ import annotations

import h5py
import numpy as np
import torch

import gradindex as gi
from tests.conftest import scheduler, tiny_unet


def test_float16_store_holds_the_float16_rounding_of_the_float32_rows(tmp_path, images):
    """store_dtype='float16' writes half-precision datasets (norms stay float32) whose values
    are the float16 rounding of the rows a float32 build stores; the reader widens them."""
    model, sched = tiny_unet(5), scheduler()
    spec = gi.BuildSpec(proj_dim=48, timesteps=2, batch_size=8)
    kw = dict(checkpoints=[(model, sched)], data=images, progress=False)
    threads = torch.get_num_threads()
    gi.build_index(out=tmp_path / "f32", spec=spec, **kw)
    # both builds on the same thread count (a build may change it: issue 16 item 11), so their
    # float32 rows agree bit for bit before the cast
    torch.set_num_threads(threads)
    half = gi.build_index(out=tmp_path / "f16", spec=spec.replace(store_dtype="float16"), **kw)
    with (
        h5py.File(tmp_path / "f32" / "vectors.h5", "r") as a,
        h5py.File(tmp_path / "f16" / "vectors.h5", "r") as b,
    ):
        for m in ("tracin", "retrac"):
            assert a[m].dtype == np.float32 and b[m].dtype == np.float16, m
            rows32 = a[m][()]
            rounded = rows32.astype(np.float16)
            np.testing.assert_array_equal(b[m][()], rounded)
            assert not np.array_equal(rounded.astype(np.float32), rows32)  # rounding is visible
            np.testing.assert_array_equal(half.vectors(m), rounded.astype(np.float32))
        assert b["norms"].dtype == np.float32
        np.testing.assert_array_equal(b["norms"][()], a["norms"][()])
