"""Phase profiles for the featurizing benchmarks: a function's or method's calls timed in place.

``bench_featurize.py`` (its profile section), ``featurize_overhead.py`` and
``featurize_precision.py`` each split a warm featurizing's time by wrapping the functions that do
the phases; this is that wrapper, once.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable


def time_calls(
    owner: object,
    name: str,
    key: str,
    spent: dict[str, float],
    clock: Callable[[], float] = time.process_time,
) -> None:
    """Replace ``owner.name`` (a module's function, a class's method or staticmethod) by a
    wrapper that adds each call's ``clock`` time to ``spent[key]``."""
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + clock() - start

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(timed) if static else timed)
