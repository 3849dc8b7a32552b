"""The browser's limits: what one request may send and ask for (safe defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Upload bytes, decoded pixels per image, images per upload, k, uploads in progress at
    once, results per file."""

    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096  # width x height of one decoded query image
    max_images: int = 16  # query images in one upload (.npy of several)
    max_k: int = 50
    max_queries: int = 4  # uploads in progress at once (one embeds, the rest wait); more: 503
    max_results: int = 100_000  # records of one results.jsonl
    page_size: int = 10  # queries per page of the results viewer
    reach_queries: int = 500  # training rows queried at startup for the "reach" of each row
    reach_k: int = 10
