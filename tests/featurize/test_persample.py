"""HookGradients (per-item gradients from one batched backward) against a plain autograd loop."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

import gradindex as gi
from gradindex.errors import ModelError
from gradindex.featurize.gradients import GradientFeaturizer, select_parameters
from gradindex.featurize.persample import HookGradients
from gradindex.inputs.models import Checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second OpenMP thread only adds barrier waits on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LOSSES = {
    "mse": lambda out, target: (out - target).pow(2).flatten(1).mean(1),
    "l1": lambda out, target: (out - target).abs().flatten(1).mean(1),
    "square": lambda out, target: out.pow(2).flatten(1).mean(1),
}


def call(model, x, t):
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def loop_gradients(model, names, loss_fn, x, t, target):
    """One item, one torch.autograd.grad at a time → [I, p] in the order of names."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    rows = []
    for i in range(x.shape[0]):
        value = loss_fn(call(model, x[i : i + 1], t[i : i + 1]), target[i : i + 1]).sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def max_rel_err(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def unet(
    seed: int, channels: int = 3, size: int = 8, blocks=(8, 16), groups: int = 4, head: int = 8
):
    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=blocks,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=groups,
        attention_head_dim=head,
    )
    with torch.no_grad():  # move off the initialisation (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch(n: int, shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.randn(n, *shape, generator=g)


class Toy(nn.Module):
    """Every supported rule: a conv on a large map, strided/padded/dilated/'same'/grouped/1×1
    convs, GroupNorm, Linear on 3-D tokens, a Linear called twice, LayerNorm, a shared weight."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.conv0 = nn.Conv2d(3, 7, 3, padding=1)  # 17×17 map: per-item weight via grouped conv
        self.conv1 = nn.Conv2d(7, 5, 3, stride=2, padding=1, bias=False)  # → 9×9, patches
        self.conv2 = nn.Conv2d(5, 5, 3, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(5, 5, (2, 4), padding="same")  # asymmetric padding
        self.depthwise = nn.Conv2d(5, 5, 3, padding=1, groups=5)
        self.pointwise = nn.Conv2d(5, 5, 1)
        self.norm = nn.GroupNorm(1, 5)
        self.temb = nn.Linear(1, 5)
        self.proj = nn.Linear(5, 6)
        self.mix = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)
        self.tail = nn.Linear(6, 2)
        self.tail.weight = self.head.weight  # tied: one parameter, two modules

    def forward(self, x, t):
        h = self.conv0(x)
        h = F.silu(h, inplace=True) if self.inplace else F.silu(h)  # in place on a module output
        h = self.conv1(h)
        h = self.conv2(h) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        h = self.pointwise(self.depthwise(self.conv3(h)))
        h = self.norm(h)
        tokens = h.flatten(2).transpose(1, 2)  # [I, 81, 5]
        z = self.proj(tokens)
        z = self.mix(torch.tanh(self.mix(z)))  # the same module twice
        z = self.ln(z)
        return self.head(z) + self.tail(z).flip(1)  # [I, 81, 2]


@pytest.mark.parametrize("loss", ["mse", "l1", "square"])
def test_unet_matches_loop(loss):
    model = unet(1)
    names = [n for n, _ in model.named_parameters()]
    assert HookGradients.supports(model, names)
    x, t, target = batch(5, (3, 8, 8))
    hooks = HookGradients(model, names, LOSSES[loss])
    got = hooks.item_gradients(x, t, target)
    ref = loop_gradients(model, names, LOSSES[loss], x, t, target)
    assert got.shape == (5, sum(p.numel() for p in model.parameters()))
    assert max_rel_err(got, ref) <= 1e-5
    # no hook is left behind
    assert all(not m._forward_hooks for m in model.modules())


def test_unet_odd_channels_large_map_and_out_buffer():
    # odd channel counts (groups of 3, 5 heads of 3) on a 16×16 map, where the top-level
    # convolutions take the grouped-convolution route
    model = unet(2, channels=1, size=16, blocks=(9, 15), groups=3, head=3)
    names = [n for n, _ in model.named_parameters()]
    x, t, target = batch(5, (1, 16, 16), seed=1)
    hooks = HookGradients(model, names, LOSSES["mse"])
    out = torch.full((5, hooks.num_params), float("nan"))
    got = hooks.item_gradients(x, t, target, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert max_rel_err(got, loop_gradients(model, names, LOSSES["mse"], x, t, target)) <= 1e-5


def test_parameter_subset():
    model = unet(3)
    names = select_parameters(
        model, ("up_blocks.*", "*.attentions.*.to_q.weight", "time_embedding.*")
    )
    assert 0 < len(names) < len(list(model.parameters()))
    x, t, target = batch(5, (3, 8, 8), seed=2)
    got = HookGradients(model, names, LOSSES["l1"]).item_gradients(x, t, target)
    ref = loop_gradients(model, names, LOSSES["l1"], x, t, target)
    assert got.shape == ref.shape
    assert max_rel_err(got, ref) <= 1e-5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("inplace", [False, True])
def test_toy_module_every_rule(inplace):
    torch.manual_seed(4)
    model = Toy(inplace=inplace).eval()
    names = [n for n, _ in model.named_parameters()]
    assert "tail.weight" not in names  # the tied weight is listed once, under head
    x, t, _ = batch(5, (3, 17, 17), seed=3)
    target = torch.randn(5, 81, 2)
    hooks = HookGradients(model, names, LOSSES["mse"])
    got = hooks.item_gradients(x, t, target)
    ref = loop_gradients(model, names, LOSSES["mse"], x, t, target)
    assert max_rel_err(got, ref) <= 1e-5
    assert hooks._clone == inplace  # an in-place op on a module output switches to copies
    # a subset that skips the first layers, in an order other than the model's
    subset = ["ln.weight", "mix.weight", "conv3.weight", "norm.bias", "head.weight"]
    got = HookGradients(model, subset, LOSSES["square"]).item_gradients(x, t, target)
    assert max_rel_err(got, loop_gradients(model, subset, LOSSES["square"], x, t, target)) <= 1e-5


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("inplace", [False, True])
def test_blocks_hold_the_loop_gradients_parameter_by_parameter(inplace):
    # every rule, a module run twice, a tied weight, a module the forward never calls (its
    # blocks must be zeros, not stale numbers), and a subset in another order
    torch.manual_seed(4)
    model = Toy(inplace=inplace).eval()
    model.spare = nn.Linear(3, 4)  # never called by Toy.forward
    x, t, _ = batch(5, (3, 17, 17), seed=3)
    target = torch.randn(5, 81, 2)
    for names in (
        [n for n, _ in model.named_parameters()],
        ["ln.weight", "spare.weight", "mix.weight", "conv3.weight", "norm.bias", "head.weight"],
    ):
        hooks = HookGradients(model, names, LOSSES["mse"])
        ref = loop_gradients(model, names, LOSSES["mse"], x, t, target)  # [I, p]
        flat = torch.full((5 * hooks.num_params + 7,), float("nan"))  # larger than needed
        blocks = hooks.item_gradient_blocks(x, t, target, flat=flat)
        spans = hooks.column_blocks()
        sizes = [dict(model.named_parameters())[n].numel() for n in names]
        assert sorted(b - a for a, b in spans) == sorted(sizes)  # one block per parameter
        assert [a for a, _ in spans] == sorted(a for a, _ in spans) and spans[0][0] == 0
        assert all(spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
        for (a, b), block in zip(spans, blocks, strict=True):
            assert block.is_contiguous() and block.data_ptr() == flat[5 * a :].data_ptr()
            if ref[:, a:b].abs().max() == 0:  # the spare module's parameter
                assert torch.equal(block, torch.zeros_like(block))
            else:
                assert max_rel_err(block, ref[:, a:b]) <= 1e-5
        assert torch.isnan(flat[5 * hooks.num_params :]).all()  # nothing written past I·p


def test_unsupported_models():
    bn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 3, padding=1)
    )
    assert not HookGradients.supports(bn, ["0.weight"])  # BatchNorm anywhere mixes the batch
    per_item = nn.Sequential(nn.Conv1d(4, 4, 1), nn.Linear(4, 4))
    assert HookGradients.supports(per_item, ["1.weight"])  # an unselected per-item module is fine
    assert not HookGradients.supports(per_item, ["0.weight"])  # but its weight has no rule
    emb = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 4))
    assert not HookGradients.supports(emb, ["0.weight"])  # max_norm rewrites the weight
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert not HookGradients.supports(conv, ["0.weight"])
    with pytest.raises(ValueError, match="HookGradients supports"):
        HookGradients(bn, ["0.weight"], LOSSES["mse"])


class BNDenoiser(nn.Module):
    """(x_t, t) → ε̂ with a BatchNorm: batch-independent in eval mode, but refused by hooks."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.temb = nn.Linear(1, 6)
        self.conv_out = nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.bn(self.conv_in(x)) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        return self.conv_out(torch.tanh(h))


def checkpoint(model) -> Checkpoint:
    return Checkpoint(model.eval(), DDPMScheduler(num_train_timesteps=1000), "memory:0", "test")


def test_batchnorm_model_falls_back_to_vmap(caplog):
    torch.manual_seed(5)
    model = BNDenoiser().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    spec = gi.BuildSpec(projection="identity", timesteps=2)
    with caplog.at_level(logging.INFO, logger="gradindex.featurize.gradients"):
        feat = GradientFeaturizer(checkpoint(model), spec)
    assert feat.backend == "vmap"
    assert "via vmap" in caplog.text
    with pytest.raises(ModelError, match="backend='hooks'"):
        GradientFeaturizer(checkpoint(model), spec, backend="hooks")
    x, t, target = batch(5, (1, 8, 8), seed=6)
    names = [n for n, _ in model.named_parameters()]
    ref = loop_gradients(model, names, LOSSES["mse"], x, t, target)
    assert max_rel_err(feat.item_gradients(x, t, target), ref) <= 1e-5


@pytest.mark.parametrize(
    "loss,prediction_type,draws", [("mse", "epsilon", 1), ("l1", "v_prediction", 2)]
)
def test_featurize_hooks_equals_vmap(loss, prediction_type, draws):
    """Timesteps folded into one call (hooks, several per call) give the features of the
    one-timestep-per-call vmap path: tracin, retrac and per-draw norms."""
    model = unet(6, channels=1)
    ckpt = Checkpoint(
        model, DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type), "m", "f"
    )
    spec = gi.BuildSpec(
        projection="identity", timesteps=3, noise_draws=draws, loss=loss, num_train_timesteps=1000
    )
    x0 = batch(2, (1, 8, 8), seed=7)[0].clamp(-1, 1)
    # hooks: 2 timesteps per call, then 1; vmap: 1 timestep per call
    hooks = GradientFeaturizer(ckpt, spec, backend="hooks", max_items=4 * draws)
    vmap = GradientFeaturizer(ckpt, spec, backend="vmap", max_items=1)
    assert (hooks.backend, vmap.backend) == ("hooks", "vmap")
    a, b = hooks.featurize(x0, spec.draws((1, 8, 8))), vmap.featurize(x0, spec.draws((1, 8, 8)))
    assert max_rel_err(a.tracin, b.tracin) <= 1e-5
    assert max_rel_err(a.retrac, b.retrac) <= 1e-5
    torch.testing.assert_close(a.norms, b.norms, rtol=1e-5, atol=0)
    assert a.norms.shape == (2, 3 * draws)


def test_backend_name_is_checked():
    with pytest.raises(gi.SpecError, match="backend"):
        GradientFeaturizer(checkpoint(unet(0, channels=1)), gi.BuildSpec(), backend="fast")
