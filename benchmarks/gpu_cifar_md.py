"""The markdown report of ``gpu_cifar.py`` (``bench_gpu.py --sections cifar``)."""

from __future__ import annotations

BATCHES = (16, 64, 128)  # images per batch of the default builds
BIG_MEMORY = "64G"  # a max_memory that lets a batch of 128 into one gradient call
PARTS = (
    "loop",
    "warmup",
    *(f"auto_b{b}" for b in BATCHES),
    "auto_b128_mem",
    "trak",
    "cpu_auto",
    "sjlt_full_b16",
    "cpu_sjlt",
)


def _x(value: float | None, loop: float | None) -> str:
    return f"{value / loop:.2f}×" if value and loop else "—"


def cifar_markdown(res: dict) -> str:
    """The results as a short markdown report."""
    m, parts = res["machine"], res.get("parts", {})
    loop = parts.get("loop", {}).get("draws_per_s")
    lines = [
        f"# GPU check at {res['params']:,} parameters ({res['mode']})",
        "",
        f"Device {res['device']}: {m.get('gpu') or 'no GPU'} (CUDA {m.get('cuda')}), "
        f"{m.get('cpus')} CPUs, torch {m.get('torch')}. Settings {res['settings']}; TF32 "
        f"{res['tf32']}. Everything below measured in this one run; × is against the loop.",
        "",
        "| part | status | draws/s | × loop | featurize draws/s | × loop | GPU peak MB "
        "| items per call | spec (projection, norms, precision) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PARTS:
        r = parts.get(name)
        if r is None:
            continue
        rate, feat = r.get("draws_per_s"), r.get("featurize_draws_per_s")
        spec = r.get("spec")
        peak = r.get("gpu_peak_mb")
        note = r.get("reason", "").replace("|", "/")  # a table cell
        if "rel_error" in str(r.get("tracin")):
            t, q = r["tracin"], r["retrac"]
            note = (
                f"vs {r['against']}: rel. err TracIn {t['rel_error']:.1e} (max row "
                f"{t['max_row_rel_error']:.1e}), ReTrac {q['rel_error']:.1e}, norms "
                f"{r['norms_max_rel_error']:.1e}"
            )
        elif "trak_projection_vectors_per_s" in r:
            note = (
                f"projection vectors/s: TRAK {r['trak_projection_vectors_per_s']:.1f}, "
                f"sjlt {r['sjlt_projection_vectors_per_s']:.1f}"
            )
        elif "fidelity_s" in r:
            note = f"fidelity check {r['fidelity_s']:.1f} s of {r['seconds']:.1f} s"
        lines.append(
            f"| {name} | {r['status']} | {f'{rate:.1f}' if rate else '—'} | {_x(rate, loop)} | "
            f"{f'{feat:.1f}' if feat else '—'} | {_x(feat, loop)} | "
            f"{f'{peak:.0f}' if peak else '—'} | {r.get('items_per_call', '—')} | "
            f"{', '.join(spec.values()) if spec else '—'} | {note} |"
        )
    lines += [
        "",
        "loop: one forward + `torch.autograd.grad` per draw, float32, no projection. auto_bB: "
        "`build_index`, default spec, B images per batch (whole build: featurize, fidelity "
        "check, storage, FAISS); auto_b128_mem: with `max_memory=" + BIG_MEMORY + "`. trak: "
        "vmap per-draw gradients projected by TRAK's `CudaProjector`. cpu_*: the first "
        "images rebuilt on the CPU with that part's resolved spec.",
    ]
    return "\n".join(lines) + "\n"
