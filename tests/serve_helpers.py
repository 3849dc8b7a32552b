"""Shared by the tests of gradindex serve: a tiny index over a .npy file, the app over it
(TestClient, or uvicorn in a thread), query images, and brute-force references."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import h5py
import numpy as np
import pytest

import gradindex as gi
from tests.conftest import run, scheduler, tiny_unet

if not os.environ.get("CI"):  # CI installs the dev extra: a missing web stack fails there
    pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from gradindex.serve.app import create_app  # noqa: E402
from gradindex.serve.limits import Limits  # noqa: E402

K = 4
N = 16  # training rows of the tiny index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 16-row index over train.npy (two saved checkpoints) and its training images."""
    from diffusers import DDPMPipeline

    root = tmp_path_factory.mktemp("serve")
    paths = []
    for i, seed in enumerate((1, 2)):
        ckpt = root / "run" / f"checkpoint-{(i + 1) * 10}"
        tiny_unet(seed).save_pretrained(ckpt / "unet")
        paths.append(ckpt)
    DDPMPipeline(unet=tiny_unet(2), scheduler=scheduler()).save_pretrained(root / "run")
    train = np.random.default_rng(0).random((N, 1, 8, 8), dtype=np.float32)
    np.save(root / "train.npy", train)
    spec = gi.BuildSpec(proj_dim=64, timesteps=3, noise_draws=2, batch_size=16)
    with pytest.warns(UserWarning, match="fidelity"):  # 64 dims: below the fidelity bar
        gi.build_index(
            checkpoints=paths, data=str(root / "train.npy"), out=root / "idx", spec=spec,
            progress=False,
        )  # fmt: skip
    return root, train


@pytest.fixture(scope="module")
def index(built):
    return gi.AttributionIndex.open(built[0] / "idx")


def class_conditional_index(tmp_path) -> tuple[gi.AttributionIndex, np.ndarray, np.ndarray]:
    """A tiny class-conditional index (3 classes, 12 training images in a .npz with their
    labels): (index, images, labels)."""
    model = tiny_unet(3, num_class_embeds=3)
    train = np.random.default_rng(5).random((12, 1, 8, 8), dtype=np.float32)
    labels = np.arange(12) % 3
    np.savez(tmp_path / "train.npz", images=train, labels=labels)
    spec = gi.BuildSpec(proj_dim=64, timesteps=2, batch_size=16)
    with pytest.warns(UserWarning, match="fidelity"):
        idx = gi.build_index(checkpoints=[(model, scheduler())], data=str(tmp_path / "train.npz"),
                             out=tmp_path / "idx", spec=spec, progress=False)  # fmt: skip
    return idx, train, labels


def png_of(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def query_pixels(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((8, 8)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def client(index):
    return TestClient(create_app(index, limits=Limits(reach_k=2)), raise_server_exceptions=False)


# -- the browser -----------------------------------------------------------------------------


@contextmanager
def running(app) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free loopback port: its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(index):
    """The app over the tiny index, served in a thread: its base URL."""
    with running(create_app(index, limits=Limits(page_size=2, reach_k=2))) as url:
        yield url


@pytest.fixture(scope="module")
def with_factors(built, tmp_path_factory):
    """A copy of the tiny index with influence factors, added by 'gradindex factors'."""
    folder = tmp_path_factory.mktemp("influence") / "idx"
    shutil.copytree(built[0] / "idx", folder)
    res = run("factors", folder, "--data", built[0] / "train.npy")
    assert res.exit_code == 0, res.output
    return folder


def self_scores(built) -> dict[str, np.ndarray]:
    """Per method, every stored row's inner product with every other ([N, N], self -inf)."""
    with h5py.File(built[0] / "idx" / "vectors.h5", "r") as f:
        vecs = {m: np.asarray(f[m], np.float64) for m in ("tracin", "retrac")}
    out = {}
    for m, v in vecs.items():
        out[m] = v @ v.T
        np.fill_diagonal(out[m], -np.inf)
    return out


def brute_force_reach(built, k: int = 2) -> dict[str, np.ndarray]:
    """Per method, in how many rows' top-k others (inner product, self left out) each row is."""
    return {
        m: np.bincount(np.argsort(-s, axis=1)[:, :k].ravel(), minlength=len(s))
        for m, s in self_scores(built).items()
    }
