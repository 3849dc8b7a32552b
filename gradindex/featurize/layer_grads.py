"""The per-item gradient of one module call, by module type (the hooks' arithmetic).

Holds ``forward_hook``: the forward hook that keeps a selected module's input a and taps its
output; on the backward, with δ = ∂(Σ_i loss_i)/∂output, it forms each item's gradient in place
in the call's output and drops a. The rules (``write_layer_grads``): Linear g_W[i] = Σ_pos
δ[i]ᵀ a[i]; Conv2d the same over the kh×kw patches of a (``conv2d_item_weight_grads``); GroupNorm
/ LayerNorm Σ_pos δ ⊙ x̂ with x̂ recomputed from a; bias Σ_pos δ; Embedding δ[i] scattered into
the rows a[i] indexes. Exact for batch-independent models (see ``persample``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradindex.featurize.scratch import scratch
from gradindex.featurize.taps import Call, Tap, saved_input

_PATCH_BYTES = 128 * 2**20  # cap on the Conv2d input patches copied at once


def forward_hook(slots: dict[str, tuple[int, int]], call: Call) -> Callable:
    """The hook of one selected module: ``slots`` are its parameters' column ranges; their
    per-item gradients go into ``call`` when the backward reaches the module's output."""
    n = call.items

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        take = saved_input(module, args, kwargs, output, n)

        def on_grad(delta: Tensor) -> None:
            a = take()
            with torch.no_grad():
                write_layer_grads(module, *factor_dtypes(module, a, delta), slots, call)

        return Tap.apply(output, call.anchor, on_grad, call.clone)

    return hook


def factor_dtypes(module: nn.Module, a: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's input and output gradient in the dtype its per-item gradient is formed in:
    bfloat16 for a Linear / Conv2d that autocast ran in bfloat16 (its δ is bfloat16; the
    per-item matmul at half the bytes, its result written to float32), float32 otherwise
    (Embedding indices stay long)."""
    if delta.dtype == torch.bfloat16 and isinstance(module, (nn.Linear, nn.Conv2d)):
        return a.to(torch.bfloat16), delta
    return (a.float() if a.is_floating_point() else a), delta.float()


def write_layer_grads(
    module: nn.Module, a: Tensor, delta: Tensor, slots: dict[str, tuple[int, int]], call: Call
) -> None:
    """Per-item gradients of the selected parameters of one module call, into ``call.out``
    (a, δ as ``factor_dtypes`` gives them; sums taken in float32)."""
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        d = delta.reshape(n, -1, module.out_features)  # [I, L, out]
        if "weight" in slots:
            view, first = call.target(slots["weight"], (module.out_features, module.in_features))
            bmm_into(view, d.transpose(1, 2), a.reshape(n, -1, module.in_features), first)
        if "bias" in slots:
            call.write(slots["bias"], d.sum(1, dtype=torch.float32))  # [I, out]
    elif isinstance(module, nn.Conv2d):
        if "weight" in slots:
            _conv2d_weight_grads(module, a, delta, slots["weight"], call)
        if "bias" in slots:
            call.write(slots["bias"], delta.sum((2, 3), dtype=torch.float32))  # [I, out]
    elif isinstance(module, nn.GroupNorm):
        d = delta.reshape(n, module.num_channels, -1)  # [I, C, L]
        if "weight" in slots:
            x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
            call.write(slots["weight"], (d * x_hat.reshape(d.shape)).sum(2))  # [I, C]
        if "bias" in slots:
            call.write(slots["bias"], d.sum(2))
    elif isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        d = delta.reshape(n, -1, *shape)  # [I, L, *shape]
        if "weight" in slots:
            x_hat = F.layer_norm(a, shape, None, None, module.eps)
            call.write(slots["weight"], (d * x_hat.reshape(d.shape)).sum(1))
        if "bias" in slots:
            call.write(slots["bias"], d.sum(1))
    elif isinstance(module, nn.Embedding):  # g_W[i] = Σ_pos onehot(a[i, pos]) δ[i, pos]
        idx = a.reshape(n, -1)  # [I, L] long
        d = delta.reshape(n, idx.shape[1], module.embedding_dim)  # [I, L, E]
        if module.padding_idx is not None:  # torch gives the padding row no gradient
            d = d * (idx != module.padding_idx).unsqueeze(-1)
        view, first = call.target(slots["weight"], (module.num_embeddings, module.embedding_dim))
        if first:
            view.zero_()
        items = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)  # [I, L]
        view.index_put_(
            (items.reshape(-1), idx.reshape(-1)), d.reshape(-1, d.shape[-1]), accumulate=True
        )
    else:  # guarded by supports()
        raise TypeError(f"no per-item gradient rule for {type(module).__name__}")


def bmm_into(view: Tensor, x: Tensor, y: Tensor, first: bool) -> None:
    """view (+)= x @ y per item, [i, m, k] @ [i, k, n], written in place into a strided view
    (bfloat16 x, y: multiplied in bfloat16, the result written to the float32 view)."""
    if x.dtype != view.dtype:
        _accumulate(view, torch.bmm(x, y), first)
    elif first:
        torch.bmm(x, y, out=view)
    else:
        view.baddbmm_(x, y)


def _conv2d_weight_grads(
    module: nn.Conv2d, a: Tensor, delta: Tensor, slot: tuple[int, int], call: Call
) -> None:
    """Per-item weight gradients of one Conv2d call into its slot of ``call.out``."""
    c_out, c_in = module.out_channels, module.in_channels // module.groups
    kh, kw = module.kernel_size
    view, first = call.target(slot, (c_out, c_in * kh * kw))
    conv2d_item_weight_grads(module, a, delta, view, first)


def conv2d_item_weight_grads(
    module: nn.Conv2d, a: Tensor, delta: Tensor, view: Tensor, first: bool
) -> None:
    """view [I, out, in/groups·kh·kw] (+)= g_W[i] = δ[i] · patches(a[i])ᵀ, by the fastest of three
    routes for the layer's shape (they differ by up to 5× either way on CPU,
    docs/build-speed.md): one convolution weight gradient whose groups are the items (large maps,
    ≥ 8 channels in and out), kh·kw shifted matmuls (large maps, few output channels, stride 1), or
    patches as a strided view of the padded input (copied a few items at a time, a no-op for 1×1
    kernels)."""
    c_in, c_out, groups = a.shape[1], module.out_channels, module.groups
    kh, kw = module.kernel_size
    positions = delta.shape[2] * delta.shape[3]
    if isinstance(module.padding, str):  # 'same' / 'valid': possibly asymmetric
        pad = tuple(module._reversed_padding_repeated_twice)
    else:
        pad = (module.padding[1], module.padding[1], module.padding[0], module.padding[0])
    large = kh * kw > 1 and positions >= 256
    if groups > 1 or (large and min(c_in, c_out) >= 8 and c_in * c_out <= 8192):
        _grouped_weight_grads(module, a, delta, pad, view, first)
    elif large and c_out < 8 and module.stride == (1, 1) and module.dilation == (1, 1):
        spare = (*pad[:3], pad[3] + 1)  # one more row at the bottom: the last offset's tail
        _shifted_weight_grads(F.pad(a, spare), delta, (kh, kw), view, first)
    else:
        _patch_weight_grads(module, F.pad(a, pad) if any(pad) else a, delta, view, first)


def _accumulate(view: Tensor, g: Tensor, first: bool) -> None:
    """view = g on a call's first write, view += g after (g in view's dtype or cast to it)."""
    if first:
        view.copy_(g)
    else:
        view += g


def _grouped_weight_grads(
    module: nn.Conv2d, a: Tensor, delta: Tensor, pad: tuple, view: Tensor, first: bool
) -> None:
    """The items as the groups of one convolution weight gradient (a as [1, I·in, H, W], δ as
    [1, I·out, H', W']); symmetric padding goes to the convolution, sparing a padded copy."""
    n, c_in = a.shape[:2]
    c_out, groups = module.out_channels, module.groups
    kh, kw = module.kernel_size
    padding = (pad[2], pad[0])
    if pad[0] != pad[1] or pad[2] != pad[3]:  # asymmetric ('same' with an even kernel)
        a, padding = F.pad(a, pad), (0, 0)
    g = torch.nn.grad.conv2d_weight(
        a.reshape(1, n * c_in, *a.shape[2:]),
        (n * c_out, c_in // groups, kh, kw),
        delta.reshape(1, n * c_out, *delta.shape[2:]),
        module.stride,
        padding,
        module.dilation,
        n * groups,
    )
    _accumulate(view, g.view(n, c_out, -1), first)  # [I, out, in/groups·kh·kw]


def _shifted_weight_grads(
    a: Tensor, delta: Tensor, kernel: tuple[int, int], view: Tensor, first: bool
) -> None:
    """Stride 1, dilation 1: with a (padded, one spare row at the bottom) flattened over its
    padded width w, kernel offset (y, x) sees a[:, :, y·w + x :][: H'·w] as its [in, H'·w] patch
    matrix, a view; δ widened to w with zeros cancels the columns that wrap around. kh·kw batched
    matmuls, no patch copy (a small output count would otherwise pay a copy of every patch)."""
    n, c_in, _, w = a.shape
    c_out, ho, wo = delta.shape[1:]
    kh, kw = kernel
    flat = a.reshape(n, c_in, -1)
    d = F.pad(delta, (0, w - wo)).reshape(n, c_out, ho * w)  # [I, out, H'·w]
    parts = torch.empty(kh * kw, n, c_out, c_in, device=a.device, dtype=a.dtype)
    for y in range(kh):
        for x in range(kw):
            start = y * w + x
            torch.bmm(d, flat[:, :, start : start + ho * w].transpose(1, 2), out=parts[y * kw + x])
    _accumulate(view.view(n, c_out, c_in, kh * kw), parts.permute(1, 2, 3, 0), first)


def _patch_weight_grads(
    module: nn.Conv2d, a: Tensor, delta: Tensor, view: Tensor, first: bool
) -> None:
    """Patches of the padded input a as a strided view, copied a few items at a time into a kept
    buffer, then one batched matmul with δ."""
    n, c_in = a.shape[:2]
    c_out = module.out_channels
    kh, kw = module.kernel_size
    positions = delta.shape[2] * delta.shape[3]
    d = delta.reshape(n, c_out, positions)  # [I, out, L]
    s0, s1, s2, s3 = a.stride()
    (dh, dw), (sh, sw) = module.dilation, module.stride
    step = max(1, _PATCH_BYTES // (c_in * kh * kw * positions * a.element_size()))
    for s in range(0, n, step):
        chunk = a[s : s + step]
        windows = chunk.as_strided(
            (chunk.shape[0], c_in, kh, kw, delta.shape[2], delta.shape[3]),
            (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw),
        )
        if kh * kw == 1:  # 1×1, stride 1: reshape is a view
            patches = windows.reshape(chunk.shape[0], c_in * kh * kw, positions)
        else:  # copied into a kept buffer: a fresh one of > 32 MiB page-faults on every call
            patches = scratch.get("patches", windows.shape, a.device, a.dtype)
            patches = patches.copy_(windows).view(chunk.shape[0], c_in * kh * kw, positions)
        bmm_into(view[s : s + step], d[s : s + step], patches.transpose(1, 2), first)


def factorable(module: nn.Module) -> bool:
    """A weight whose gradient is Σ_pos δ_pos a_posᵀ with a_pos a patch of ``F.unfold``."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )
