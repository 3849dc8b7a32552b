"""Print the gradindex functions a small build enters, from ``build_index`` to its first
``VectorStore.write_rows``, in the order first entered (the thread named when not the main one).

The walk of a training image in docs/architecture.md is read off this list: it shows every
function entered, and the walk keeps those its counting rule names. The gradient engine inside
``GradientFeaturizer.featurize`` is left out unless ``--engine`` is given.

    python tools/trace_build.py [--float] [--engine]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

import gradindex as gi

ENGINE = ("featurize/gradients.py", "featurize/persample.py", "featurize/taps.py",
          "featurize/layer_grads.py", "featurize/losses.py", "featurize/aggregate.py",
          "featurize/scratch.py", "draws.py", "inputs/models.py:model_output")  # fmt: skip


def trace(data: np.ndarray) -> list[tuple[str, str]]:
    """(file:function, thread) of each gradindex function entered, first entries only."""
    from tests.conftest import scheduler, tiny_unet

    root = str(Path(gi.__file__).parent) + "/"
    seen: dict[tuple[str, str], str] = {}
    state = {"on": False, "done": False}

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
        code = frame.f_code
        if event != "call" or state["done"] or not code.co_filename.startswith(root):
            return
        name = getattr(code, "co_qualname", code.co_name)
        state["on"] |= name == "build_index"
        if state["on"]:
            where = f"{code.co_filename[len(root) :]}:{name}"
            seen.setdefault((where, threading.current_thread().name), where)
            state["done"] = name == "VectorStore.write_rows"

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "train.npy", data)
        sys.setprofile(profile)
        threading.setprofile(profile)
        try:
            gi.build_index(
                checkpoints=[(tiny_unet(1), scheduler())],
                data=str(Path(tmp) / "train.npy"),
                out=Path(tmp) / "idx",
                spec=gi.BuildSpec(proj_dim=8, timesteps=1, batch_size=16),
                progress=False,
                fidelity_sample=0,
            )
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float", action="store_true", help="float pixels instead of uint8")
    parser.add_argument("--engine", action="store_true", help="list the gradient engine too")
    args = parser.parse_args()
    pixels = np.random.default_rng(0).random((10, 1, 8, 8))
    data = pixels.astype(np.float32) if args.float else (pixels * 255).astype(np.uint8)
    for where, thread in trace(data):
        engine = where.startswith(ENGINE) and not where.endswith("GradientFeaturizer.featurize")
        if args.engine or not engine:
            print(where + ("" if thread == "MainThread" else f"  [{thread}]"))


if __name__ == "__main__":
    main()
