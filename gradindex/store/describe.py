"""``gradindex info`` for people: the manifest's summary (``records.summary``, what
``AttributionIndex.info`` returns) as one aligned line per fact, the kernel and factors records
as the lines ``info`` and ``gradindex kernel`` print. ``--json`` prints the summary itself."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gradindex.featurize.auto import describe_auto
from gradindex.featurize.fidelity import format_fidelity
from gradindex.spec import HOOK_PROJECTIONS

# keys of AttributionIndex.info() that format_info lays out itself; any other key is rendered
# generically, so a key added later still shows
_INFO_KEYS = {
    "path",
    "weights",
    "num_rows",
    "num_flagged",
    "dim",
    "proj_dim",
    "num_params",
    "layers",
    "featurize",
    "checkpoints",
    "timesteps",
    "prediction_type",
    "spec",
    "indexes",
    "versions",
    "build_seconds",
    "data_seconds",
    "conditioning",
    "fidelity",
    "kernel",
    "run_records",
    "factors",
    "auto",
}


def format_info(info: dict[str, Any], layers: bool = False) -> list[str]:
    """``AttributionIndex.info()`` for people: one aligned line per fact (``--json``: all);
    a Kronecker index's layers summed up in two lines, or one line each with ``layers``."""
    spec = info["spec"]
    lines: list[str] = []

    def add(label: str, text: str) -> None:
        lines.append(f"{label:<12s} {text}")

    add("index", info["path"])
    add("rows", f"{info['num_rows']} ({info['num_flagged']} flagged, left out of search)")
    add("dim", f"{info['dim']} = {len(info['checkpoints'])} checkpoint(s) x {info['proj_dim']}")
    chosen = f"{', '.join(spec['params'])}; " if spec.get("params") else ""
    projection = f"{spec['projection']} projection, seed {spec['proj_seed']}"
    if (info.get("featurize") or {}).get("path") == "streamed":
        projection += ", streamed per layer"
    add("params", f"{info['num_params']:,} ({chosen}{projection})")
    if info.get("auto"):
        add("auto", describe_auto(info["auto"]))
    if spec["projection"] in HOOK_PROJECTIONS:
        if spec.get("norms") == "projected":
            add("norms", "of the projections (ReTrac: the mean of projected unit vectors)")
        routes = info.get("layers") or {}
        each = [("layer", f"{name}: {route}") for name, route in routes.items()]
        for label, text in each if layers else _layer_summary(list(routes.values())):
            add(label, text)
    ts = info["timesteps"]
    draws = f"{spec['noise_draws']} noise draw{'s' if spec['noise_draws'] != 1 else ''}"
    add("draws", f"{len(ts)} timesteps x {draws} (seed {spec['seed']}), loss {spec['loss']}")
    add("timesteps", _short_list(ts))
    lo, hi = spec.get("data_range") or (None, None)
    data = f"data range [{lo:g}, {hi:g}]" if lo is not None else "data range from the data"
    computed = spec.get("precision", "float32")  # an index from before the field: float32
    stored = f"rows stored as {spec['store_dtype']}, computed in {computed}"
    add("model", f"predicts {info['prediction_type']}, {data}, {stored}")
    cond = info.get("conditioning") or {"kind": "none"}
    if cond["kind"] != "none" or cond.get("latent"):
        extra = [f"{cond['num_classes']} classes"] if cond["kind"] == "class" else []
        if cond.get("latent"):
            extra.append(f"VAE latents ({cond['latents']}, x{cond['scaling_factor']:g})")
        add("conditioning", f"{cond['kind']}  {', '.join(extra)}".rstrip())
    for c in info["checkpoints"]:
        add("checkpoint", f"{c['source']}  w={c['weight']:g}  {c['fingerprint']}")
    for label, text in _trained_lines(spec, info.get("run_records") or {}):
        add(label, text)
    if info.get("weights") in _WEIGHTS_LINE and any(c.get("weights") for c in info["checkpoints"]):
        add("weights", _WEIGHTS_LINE[info["weights"]])  # a training run's folders: which kind
    if info.get("fidelity"):
        add("fidelity", format_fidelity(info["fidelity"]))
    indexes = info["indexes"]
    for m in sorted(indexes, key=lambda m: (m != "tracin", m != "retrac", m)):
        meta = indexes[m]
        add("search", f"{m}: {_describe_search(meta)}")
        if meta.get("fallback"):
            fb = meta["fallback"]
            add(
                "fallback",
                f"{m}: {fb.get('from')} reached recall@10 {fb.get('recall_at_10', 0):.3f} < "
                f"target {meta.get('target_recall')}; {_FALLBACK.get(fb.get('action'), '')}",
            )
        if meta.get("kind") == "ondisk":
            od = meta.get("ondisk") or {}
            add(
                "on disk",
                f"{m}: lists in {od.get('ivfdata')} ({od.get('bytes', 0) / 2**20:.1f} MiB), "
                "memory-mapped at query time",
            )
    for label, text in _served_lines(info):
        add(label, text)
    built, data = info.get("build_seconds"), info.get("data_seconds") or {}
    version = (info.get("versions") or {}).get("gradindex", "?")
    add("built", (f"in {built:g} s " if built is not None else "") + f"by gradindex {version}")
    if "waiting_s" in data:
        add("data", f"read in {data['reading_s']:g} s beside featurizing ({data['featurizing_s']:g}"
            f" s), which waited {data['waiting_s']:g} s for it")  # fmt: skip
    for key in sorted(set(info) - _INFO_KEYS):
        add(key, _render(info[key]))
    return lines


def _layer_summary(routes: list[str]) -> list[tuple[str, str]]:
    """A Kronecker index's per-tensor routes ('kronecker 16x64, formed norm', 'dense') in two
    lines: the factored tensors by factor shape and norm, the count kept whole."""
    if not routes:
        return []
    factored = [r.removeprefix("kronecker ").split(", ") for r in routes if r != "dense"]
    shapes = Counter(f[0] for f in factored).most_common()
    text = ", ".join(f"{n} at {shape}" for shape, n in shapes[:4])
    if len(shapes) > 4:
        text += f", {sum(n for _, n in shapes[4:])} in {len(shapes) - 4} other shapes"
    norms = Counter(f[1] if len(f) > 1 else "?" for f in factored).most_common()
    lines = []
    if factored:
        how = ", ".join(f"{n} {kind}" for kind, n in norms)
        lines.append(("layers", f"{len(factored)} factored P_out x P_in: {text} (norms: {how})"))
    kept = len(routes) - len(factored)
    lines.append(
        ("layers", f"{kept} of {len(routes)} parameter tensors kept whole (biases, norms, small "
         "layers); each tensor's route: gradindex info --layers")
    )  # fmt: skip
    return lines


def _served_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The methods served from the rows: the kernel (trak, retrak) and the influence factors."""
    kern = info.get("kernel")
    if kern and "skipped" in kern:
        lines = [("kernel", f"none: {kern['skipped']}")]
    elif kern:
        lines = [("kernel", kernel_line(kern))]
        if kernel_search_line(kern):
            lines.append(("kernel search", kernel_search_line(kern)))
    else:
        lines = [
            ("kernel", f"none; add it for --method trak with: gradindex kernel {info['path']}")
        ]
    return [*lines, ("factors", _factors_line(info))]


def _trained_lines(spec: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, str]]:
    """The trained loss's weighting, and what the build took from the run's records."""
    parts = []
    if spec.get("snr_weighting", "none") == "snr":
        parts.append("snr(t)")
    elif spec.get("snr_weighting") == "min_snr":
        parts.append(f"min-SNR, gamma {spec['snr_gamma']:g}")
    perturbed = ("noise_offset", "input_perturbation")
    parts += [f"{k.replace('_', ' ')} {spec[k]:g}" for k in perturbed if spec.get(k)]
    lines = [("loss weight", ", ".join(parts))] if parts else []
    if run.get("checkpoint_weights"):
        lines.append(("tracin w", f"auto, {run['checkpoint_weights']['method']}"))
    for name, origin in (run.get("taken") or {}).items():
        lines.append(("from run", f"{name}={spec.get(name)!r}: {origin}"))
    return lines


_WEIGHTS_LINE = {
    "raw": "raw (what the optimizer stepped) for every checkpoint of the run",
    "ema": "ema (the run's --use_ema averages: unet_ema/) for every checkpoint of the run",
}

_FALLBACK = {
    "fallback": "serves exact flat search instead",
    "warn": "kept as asked",
}


def _describe_search(meta: dict[str, Any]) -> str:
    """One index's kind, knobs and measured recall, e.g. 'hnsw (HNSW32,Flat), efSearch 64,
    recall@10 0.962 vs exact search (target 0.95)' (recall measured at build time)."""
    if meta.get("kind") == "flat":
        return "flat (exact)"
    knobs = ", ".join(f"{k} {v}" for k, v in (meta.get("knobs") or {}).items())
    recall = meta.get("recall_at_10")
    parts = [f"{meta.get('kind')} ({meta.get('factory')})"]
    if knobs:
        parts.append(knobs)
    if recall is not None:
        parts.append(f"recall@10 {recall:.3f} vs exact search (target {meta.get('target_recall')})")
    return ", ".join(parts)


def _short_list(values: list[Any], most: int = 12) -> str:
    """All values when few, else the first and last few with the count."""
    if len(values) <= most:
        return ", ".join(map(str, values))
    head, tail = ", ".join(map(str, values[:4])), ", ".join(map(str, values[-2:]))
    return f"{head}, ..., {tail} ({len(values)} values)"


def _render(value: Any) -> str:
    """Any JSON-like value on one line: dicts as 'key value' pairs (nested keys dotted), floats
    to 4 significant digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_render(v)}" for k, v in _flatten(value).items()) or "-"
    if isinstance(value, (list, tuple)):
        return "[" + _short_list([_render(v) for v in value], most=8) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _factors_line(info: dict[str, Any]) -> str:
    """gradindex info's line about the influence factors."""
    fac, spec = info.get("factors"), info["spec"]
    if not fac and spec["projection"] in HOOK_PROJECTIONS:
        return (
            f"none: --method influence needs a full-space query gradient, which a "
            f"{spec['projection']} index never forms (build with --projection sjlt for it)"
        )
    if not fac and spec.get("precondition", "none") != "none":
        return f"none: --method influence needs plain gradients, not {spec['precondition']!r} ones"
    if not fac:
        return (
            f"none; add them for --method influence with: gradindex factors {info['path']} "
            "--data TRAINING_DATA"
        )
    return (
        f"EK-FAC, {fac['factored_layers']} K-FAC layers + {fac['diagonal_parameters']} diagonal "
        f"parameters, from {fac['samples']} samples (--method influence)"
    )


def kernel_line(record: dict[str, Any]) -> str:
    """The manifest's kernel record in one line: rows, each kernel method's λ, the rule."""
    lams = "; ".join(
        f"{m} lambda " + ", ".join(f"{v:.4g}" for v in record[key])
        for m, key in (("trak", "lambda"), ("retrak", "lambda_retrac"))
        if key in record
    )
    rank, exact = record.get("rank") or {}, record.get("exact") or {}
    form = ", ".join(
        f"{m} rank {rank[r]} "
        + ("(exact)" if exact.get(r) else "(top eigenpairs, rest by their mean)")
        for m, r in (("trak", "tracin"), ("retrak", "retrac"))
        if r in rank
    )
    if not form:
        form = "dense Grams (format 1; convert with: gradindex kernel DIR)"
    return f"factors of {record['rows']} rows: {form}; {lams} ({record['rule']})"


def kernel_search_line(record: dict[str, Any]) -> str | None:
    """Each kernel method's recall@10 through its search index, measured when the kernel was
    written, and whether it searches exactly; None for a kernel written before it was."""
    search = record.get("search")
    if not search:
        return None
    return "; ".join(
        f"{m}: recall@10 {s['recall_at_10']:.3f} (target {s['target_recall']:g}), "
        + ("exact search" if s["exact_search"] else "approximate search")
        for m, s in sorted(search.items(), key=lambda item: item[0] != "trak")
    )
