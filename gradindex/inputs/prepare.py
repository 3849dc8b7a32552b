"""Images prepared as diffusers' example trainers prepare them (``BuildSpec.resolution``,
``center_crop``).

Holds:
- ``prepare_image(image, resolution, center_crop)``: one decoded image [C, H, W] resized so its
  shorter side is ``resolution`` (bilinear) and cropped to ``resolution`` × ``resolution`` at
  the centre: torchvision's ``Resize(resolution, BILINEAR)`` + ``CenterCrop(resolution)`` on a
  PIL image, which ``train_unconditional.py`` and ``train_text_to_image*.py`` apply, done with
  PIL's own resize (what torchvision calls for PIL images) and the same rounding.
- ``preparer(resolution, center_crop)``: that transform as a function of one image, or None.
- ``Prepared``: a training source whose rows come out so (images of any size and shape).
- ``prepare_images(images, resolution, center_crop)``: query images, the same way.

A trainer given no ``--center_crop`` crops at random (and ``--random_flip`` flips at random):
neither can be repeated, so the centre crop, unflipped, stands in for them — the middle of the
crops it drew. ``center_crop`` records which the trainer did; the pixels are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradindex.errors import DataError
from gradindex.inputs.pixels import to_nchw
from gradindex.inputs.sources import DataSource

logger = logging.getLogger(__name__)


def _resized_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """(H, W) with the shorter side ``resolution``, the longer scaled and truncated (int)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    return (new_long, resolution) if w <= h else (resolution, new_long)


def _as_pil(image: np.ndarray) -> list:
    """PIL images for [C, H, W]: one RGB / L image for uint8, one float ('F') image per channel
    otherwise (16-bit grayscale and float arrays keep their values)."""
    from PIL import Image

    c = image.shape[0]
    if image.dtype == np.uint8 and c in (1, 3):
        arr = image[0] if c == 1 else np.moveaxis(image, 0, -1)
        return [Image.fromarray(np.ascontiguousarray(arr), "L" if c == 1 else "RGB")]
    return [Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32), "F") for ch in image]


def prepare_image(image: np.ndarray, resolution: int, center_crop: bool = True) -> np.ndarray:
    """[C, H, W] → [C, resolution, resolution]: shorter side to ``resolution`` (PIL bilinear,
    skipped when the size already is that), then the centre crop (see the module docstring for
    ``center_crop=False``). uint8 stays uint8; other dtypes come back as float32."""
    from PIL import Image

    c, h, w = image.shape
    if min(h, w) < 1:
        raise DataError(f"an image of {h}x{w} pixels cannot be resized")
    nh, nw = _resized_size(h, w, resolution)
    top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    box = (left, top, left + resolution, top + resolution)
    out = []
    for im in _as_pil(image):
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.BILINEAR)
        out.append(np.asarray(im.crop(box)))
    if len(out) == 1 and out[0].ndim == 3:
        return np.moveaxis(out[0], -1, 0)
    return np.stack(out)


def preparer(
    resolution: int | None, center_crop: bool
) -> Callable[[np.ndarray], np.ndarray] | None:
    """``prepare_image`` with these settings, or None without a resolution."""
    if resolution is None:
        return None
    return lambda image: prepare_image(image, int(resolution), center_crop)


class Prepared(DataSource):
    """The rows of ``base`` (opened to take images of any size) prepared by
    ``prepare_image``: each decoded image is resized and cropped as it is read."""

    def __init__(self, base: DataSource, resolution: int, center_crop: bool):
        super().__init__()
        self.base, self.resolution, self.center_crop = base, int(resolution), center_crop
        self.name, self.decodes, self.missing = base.name, base.decodes, base.missing
        self.ids, self.labels, self.prompts = base.ids, base.labels, base.prompts
        self.skipped = base.skipped
        self._shape, self._dtype = (base.shape[0], self.resolution, self.resolution), base.dtype
        if not center_crop:
            logger.info(
                "%s: the trainer cropped at random (no --center_crop); the centre crop is used",
                base.name,
            )

    def _row(self, i: int) -> np.ndarray:
        before = self.base.bytes_read
        image = self.base.decoded(i)
        self.bytes_read += self.base.bytes_read - before
        return prepare_image(image, self.resolution, self.center_crop)


def prepare_images(images: Any, resolution: int | None, center_crop: bool) -> Any:
    """Query images (an array or tensor of any layout ``to_nchw`` reads) prepared as the
    training images were: [N, C, resolution, resolution]; as given without a resolution."""
    if resolution is None:
        return images
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = to_nchw(np.asarray(images))
    return np.stack([prepare_image(im, int(resolution), center_crop) for im in arr])
