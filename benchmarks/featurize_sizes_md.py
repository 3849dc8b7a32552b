"""The markdown tables of ``bench_featurize.py --sections sizes`` (``featurize_sizes.py``)."""

from __future__ import annotations

from featurize_sizes import BUILDS


def _rate(b: dict | None) -> str:
    return f"{b['draws_per_cpu_s']:.2f} ({b['x_loop']:.2f}×)" if b else "—"


def _rss(b: dict | None) -> str:
    return f"{b['peak_rss_mb']:.0f} ({b['rss_x_loop']:.2f}×)" if b else "—"


def _pair(c: dict, a: str, b: str) -> str:
    """Two ceilings as × loop ('—' where a result from before them lacks one)."""
    return " / ".join(f"{c[k]:.2f}×" if k in c else "—" for k in (a, b))


def sizes_markdown(res: dict) -> list[str]:
    """The section's tables: speed and memory, where the time goes, fidelity against exact."""
    lines = [
        "## Model sizes: whole builds against the per-sample loop (`--sections sizes`)",
        "",
        "Draws per CPU-second (higher is better), each contender a fresh process, interleaved; "
        "peak RSS of that process. Loop RSS is measured before its exact-score vectors. "
        "Ceilings: one batched forward + backward of a summed loss (no per-sample gradients), "
        "to the weights and inputs, or to the inputs only (all a Kronecker build with projected "
        "norms needs besides its small factor projections).",
        "",
        "| size / threads | params | loop | default build (× loop) | what 'auto' chose "
        "| full path (× loop) | large-model config (× loop) | sjlt, exact, float32 (× loop) "
        "| default in float32 (× loop) "
        "| ceiling fwd+bwd f32 / bf16 (× loop) | ceiling fwd+bwd-to-inputs f32 / bf16 (× loop) "
        "| FLOP ceiling, with / without weight grads (× loop) "
        "| RSS MB: loop / default build / sjlt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res.items():
        b, c = r.get("build", {}), r["ceiling"]
        spec = b.get("spec") or {}
        keys = ("projection", "norms", "precision")
        chose = ", ".join(str(spec[k]) for k in keys if k in spec) + f" ({b['featurize']['path']})"
        flops = f"{r['flop_ceiling_x_loop']:.2f}× / " + (
            f"{r['flop_ceiling_no_weight_grads_x_loop']:.2f}×"
            if "flop_ceiling_no_weight_grads_x_loop" in r
            else "—"
        )
        lines.append(
            f"| {key} | {r['params'] / 1e6:.2f}M | {r['loop']['draws_per_cpu_s']:.2f} "
            f"| {b['draws_per_cpu_s']:.2f} (**{b['x_loop']:.2f}×**) | {chose} "
            f"| {_rate(r.get('build_full'))} | {_rate(r.get('large_cfg'))} | {_rate(r.get('sjlt'))} "
            f"| {_rate(r.get('kron_f32'))} "
            f"| {_pair(c, 'x_loop', 'bf16_x_loop')} | {_pair(c, 'inputs_x_loop', 'inputs_bf16_x_loop')} "
            f"| {flops} | {r['loop']['peak_rss_mb']:.0f} / {_rss(b)} / {_rss(r.get('sjlt'))} |"
        )
    lines += [
        "",
        "Where each build's time goes (CPU-s; I/O and the rest: reading, storing, FAISS, "
        "manifest; set-up, outside the build's time: model and data; Kronecker's projection "
        "runs inside its gradient hooks, so it counts as gradients):",
        "",
        "| size / threads | gradients | projection | rows | fidelity | I/O and rest | total "
        "| fidelity share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res.items():
        for name in BUILDS:
            if name not in r:
                continue
            p = r[name]["phases_cpu_s"]
            total = sum(p.values())
            lines.append(
                f"| {key} {name} | {p['gradients']:.1f} | {p['projection']:.1f} | {p['rows']:.1f} "
                f"| {p['fidelity']:.1f} | {p['io_and_rest']:.1f} | {total:.1f} "
                f"| {p['fidelity'] / total:.1%} |"
            )
    lines += [
        "",
        "Stored rows against exact full-space scores (the loop's), query rows against the rest:",
        "",
        "| size / threads | build | method | Spearman | top-k overlap | the build's own record |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in res.items():
        for name in ("build", "large_cfg", "sjlt", "kron_f32"):
            if name not in r:
                continue
            b = r[name]
            for m in ("tracin", "retrac"):
                v = b["fidelity_vs_exact"][m]
                own = b["fidelity_record"]
                rec = own.get(m) or {}
                topk = v[f"top{v['k']}"]
                lines.append(
                    f"| {key} | {name} | {m} | {v['spearman']:.3f} | {topk:.2f} (k = {v['k']}) "
                    f"| {rec.get('spearman', float('nan')):.3f} ({own.get('reference')}) |"
                )
    return lines + [""]
