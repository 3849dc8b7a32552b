"""featurize/layer_grads.py and featurize/taps.py: each layer rule's per-item gradients, and the
hooks that deliver δ, against one torch.autograd.grad per item (no hook involved)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradindex.errors import ModelError
from gradindex.featurize.layer_grads import factorable, forward_hook, write_layer_grads
from gradindex.featurize.taps import (
    Call,
    HookError,
    Tap,
    forward_hooks,
    parameter_owners,
    run_taps,
    saved_input,
)


def _slots(module: nn.Module) -> tuple[dict[str, tuple[int, int]], int]:
    slots, start = {}, 0
    for name, p in module.named_parameters():
        slots[name] = (start, start + p.numel())
        start += p.numel()
    return slots, start


def _loop(module: nn.Module, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[I, p]: item i's gradient of Σ module(a[i]) ⊙ r[i] (so δ[i] = r[i]), one autograd call
    per item."""
    params = list(module.parameters())
    rows = []
    for i in range(len(a)):
        out = module(a[i : i + 1])
        grads = torch.autograd.grad((out * r[i : i + 1]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


CASES = {
    "linear 3-D input": (lambda: nn.Linear(5, 3), lambda g: torch.randn(4, 6, 5, generator=g)),
    "conv 3x3 pad": (
        lambda: nn.Conv2d(2, 3, 3, padding=1),
        lambda g: torch.randn(3, 2, 6, 5, generator=g),
    ),
    "conv 1x1": (lambda: nn.Conv2d(4, 2, 1), lambda g: torch.randn(3, 4, 5, 5, generator=g)),
    "conv stride dilation": (
        lambda: nn.Conv2d(2, 3, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0)),
        lambda g: torch.randn(3, 2, 9, 8, generator=g),
    ),
    "conv grouped": (
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda g: torch.randn(2, 4, 6, 6, generator=g),
    ),
    "conv large map": (
        lambda: nn.Conv2d(2, 3, 3, padding="same"),
        lambda g: torch.randn(2, 2, 18, 18, generator=g),
    ),
    "conv few outputs, large map (shifted matmuls)": (
        lambda: nn.Conv2d(3, 2, 3, padding=1),
        lambda g: torch.randn(3, 3, 17, 16, generator=g),
    ),
    "conv few outputs, asymmetric 'same' (shifted matmuls)": (
        lambda: nn.Conv2d(2, 1, (2, 4), padding="same"),
        lambda g: torch.randn(2, 2, 16, 19, generator=g),
    ),
    "conv grouped route, symmetric padding to the convolution": (
        lambda: nn.Conv2d(8, 8, 3, padding=(2, 1)),
        lambda g: torch.randn(2, 8, 16, 16, generator=g),
    ),
    "conv grouped route, asymmetric 'same' padded first": (
        lambda: nn.Conv2d(8, 8, (2, 4), padding="same"),
        lambda g: torch.randn(2, 8, 16, 17, generator=g),
    ),
    "conv few outputs, large map, stride 2 (patches, not shifted)": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
        lambda g: torch.randn(2, 2, 32, 32, generator=g),
    ),
    "conv few outputs, large map, dilation 2 (patches, not shifted)": (
        lambda: nn.Conv2d(2, 3, 3, dilation=2, padding=2),
        lambda g: torch.randn(2, 2, 16, 16, generator=g),
    ),
    "conv one input channel, large map (patches)": (
        lambda: nn.Conv2d(1, 9, 3, padding=1),
        lambda g: torch.randn(3, 1, 16, 16, generator=g),
    ),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda g: torch.randn(3, 4, 3, 3, generator=g)),
    "layernorm": (lambda: nn.LayerNorm(5), lambda g: torch.randn(3, 4, 5, generator=g)),
    "embedding": (
        lambda: nn.Embedding(7, 3, padding_idx=0),
        lambda g: torch.randint(0, 7, (4, 5), generator=g),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_layer_rule_equals_a_per_item_autograd_loop(case):
    torch.manual_seed(0)
    make, data = CASES[case]
    module, gen = make(), torch.Generator().manual_seed(1)
    for p in module.parameters():  # norms start at 1 / 0: make every parameter matter
        p.data = torch.randn(p.shape, generator=gen)
    a = data(gen)
    r = torch.randn(module(a).shape, generator=gen)
    slots, p = _slots(module)
    call = Call(torch.full((len(a), p), float("nan")), clone=False)
    write_layer_grads(module, a, r, slots, call)
    torch.testing.assert_close(call.out, _loop(module, a, r), rtol=1e-4, atol=1e-5)
    write_layer_grads(module, a, r, slots, call)  # a second call of the module accumulates
    torch.testing.assert_close(call.out, 2 * _loop(module, a, r), rtol=1e-4, atol=1e-5)


class _Net(nn.Module):
    """(x, t) -> output, batch-independent, with a weight used twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        h = torch.relu(self.norm(self.conv(x)))  # [I, 4, H, W]
        h = h.permute(0, 2, 3, 1)
        h = self.lin(torch.tanh(self.lin(h)))  # the Linear twice: its gradients add up
        return h.permute(0, 3, 1, 2).mean(1, keepdim=True) + t.view(-1, 1, 1, 1) * 0.01


def _mse(out, target):
    return (out - target).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("blocked", (False, True))
def test_hooks_give_per_item_gradients_of_a_whole_model(blocked):
    """forward_hook on every module, run_taps once: the rows (or the blocked layout) equal a
    per-item autograd loop; no parameter's .grad is formed and the hooks are removed after."""
    torch.manual_seed(0)
    net, gen = _Net(), torch.Generator().manual_seed(2)
    x, target = torch.randn(3, 1, 5, 5, generator=gen), torch.randn(3, 1, 5, 5, generator=gen)
    t = torch.tensor([1.0, 5.0, 9.0])
    names = [n for n, _ in net.named_parameters()]
    params = dict(net.named_parameters())
    col, start = {}, 0
    for n in names:
        col[n] = (start, start + params[n].numel())
        start += params[n].numel()
    call = Call(torch.empty(3, start), clone=False, blocked=blocked)
    hooks = [
        (m, forward_hook({k: col[f"{prefix}.{k}"] for k, _ in m.named_parameters()}, call))
        for prefix, m in (("conv", net.conv), ("norm", net.norm), ("lin", net.lin))
    ]
    with forward_hooks(hooks):
        run_taps(net, _mse, x, t, target, None, call.anchor)
    assert all(not m._forward_hooks for m, _ in hooks)
    assert all(p.grad is None for p in net.parameters())
    want = []
    for i in range(3):
        loss = _mse(net(x[i : i + 1], t[i : i + 1]), target[i : i + 1]).sum()
        want.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])
        )
    want = torch.stack(want)
    if blocked:  # parameter by parameter: block j is [I, n_j], contiguous
        got = torch.cat(
            [call.out.view(-1)[3 * a : 3 * b].view(3, b - a) for a, b in col.values()], 1
        )
    else:
        got = call.out
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_tap_hands_the_output_gradient_to_its_callback_and_nothing_else():
    gen = torch.Generator().manual_seed(3)
    lin, x = nn.Linear(3, 2), torch.randn(4, 3, generator=gen)
    anchor = torch.zeros((), requires_grad=True)
    seen = []
    out = Tap.apply(lin(x), anchor, seen.append, False)
    torch.autograd.grad((out.sin() * 3).sum(), anchor, allow_unused=True)
    y = lin(x).detach().requires_grad_()
    (delta,) = torch.autograd.grad((y.sin() * 3).sum(), y)
    torch.testing.assert_close(seen[0], delta)
    assert lin.weight.grad is None


def test_saved_input_refuses_a_moved_batch_and_an_input_changed_in_place():
    lin = nn.Linear(2, 2)
    a = torch.randn(3, 2)
    with pytest.raises(HookError, match="leading dimension of 3, not the 4 items"):
        saved_input(lin, (a,), {}, lin(a), 4)
    take = saved_input(lin, (a,), {}, lin(a), 3)
    a.mul_(2)  # the model changes the layer's input after the layer used it
    with pytest.raises(ModelError, match="in place"):
        take()
    take = saved_input(lin, (), {"input": a}, lin(a), 3)
    assert take() is not None


def test_parameter_owners_lists_a_shared_weight_under_both_modules():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    second.weight = first.weight
    model = nn.Sequential(first, second, first)  # first twice: listed once
    owners = parameter_owners(model)
    assert owners[id(first.weight)] == [(first, "weight"), (second, "weight")]
    assert owners[id(second.bias)] == [(second, "bias")]


def test_call_writes_then_accumulates_and_lays_blocks_out_contiguously():
    call = Call(torch.zeros(2, 5), clone=False)
    call.write((1, 3), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    call.write((1, 3), torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert call.out.tolist() == [[0, 2, 3, 0, 0], [0, 4, 5, 0, 0]]
    blocked = Call(torch.zeros(2, 5), clone=False, blocked=True)
    blocked.write((1, 3), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # block (1, 3) of 2 items: flat numbers [2, 6) hold item 0's then item 1's two values
    assert blocked.out.view(-1).tolist() == [0, 0, 1, 2, 3, 4, 0, 0, 0, 0]


def test_factorable_layers_are_plain_linear_and_ungrouped_zero_padded_conv():
    assert factorable(nn.Linear(2, 2)) and factorable(nn.Conv2d(2, 2, 3, padding=1))
    assert not factorable(nn.Conv2d(2, 2, 3, groups=2))
    assert not factorable(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert not factorable(nn.Conv2d(2, 2, 3, padding="same"))
    assert not factorable(nn.GroupNorm(1, 2))
