"""How commands print data: an index summary as aligned lines or JSON (numpy values made
plain), so build, add, merge and info print it the same way."""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np


def print_info(info: dict[str, Any], as_json: bool, layers: bool = False) -> None:
    """``AttributionIndex.info()``: every key as JSON, or the lines ``gradindex info`` shows
    (``layers``: a Kronecker index's every layer)."""
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True, default=json_default))
        return
    from gradindex.store.describe import format_info

    click.echo("\n".join(format_info(info, layers)))


def json_default(obj: Any) -> Any:
    """What ``json.dumps`` cannot write itself: numpy scalars and arrays, else the text."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
