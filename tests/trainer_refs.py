"""Runs laid out as diffusers' example trainers leave them, for tests (issue 25).

CI cannot run the scripts themselves (PyPI's torchvision does not load against the CPU torch
here), so these loops reproduce what the scripts save and log, step for step:

- ``train_unconditional``: ``examples/unconditional_image_generation/train_unconditional.py``
  with ``--use_ema`` (``EMAModel`` with its warm-up, saved by the script's save hook into
  ``unet_ema/``) and ``--prediction_type`` (``sample``: the snr(t)-weighted MSE to x0), gradient
  clipping at 1.0, ``accelerator.save_state`` every ``checkpointing_steps``, ``loss`` / ``lr`` /
  ``step`` / ``ema_decay`` logged every step to TensorBoard under ``init_trackers`` of the
  script's name (no config), and the final ``DDPMPipeline`` save with the EMA weights copied in.
- ``train_lora``: ``examples/text_to_image/train_text_to_image_lora.py`` with ``--snr_gamma``:
  a peft adapter on a frozen UNet, the min-SNR-weighted loss, its save hook
  (``save_lora_weights`` of the peft state dict into ``checkpoint-<step>/``), ``vars(args)``
  given to ``init_trackers``, ``train_loss`` logged (no learning rate), the final adapter file.

Each returns what the training loop itself held at every save (weights, optimizer state,
logged learning rates): the independent reference a test compares an index against.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.conftest import scheduler, tiny_unet


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide state so the next Accelerator starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerator(out: Path, log_with: str | None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    return Accelerator(log_with=log_with, project_config=project, cpu=True)


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **more) -> dict:
    """The weights (by parameter name) and optimizer state the loop holds now, copied."""
    return {
        "raw": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        **more,
    }


def _script_loss(sched, prediction_type: str, output, clean, noise, t) -> torch.Tensor:
    """train_unconditional.py's loss: MSE to ε, or for ``sample`` the snr(t)-weighted MSE to
    x0 (the script's weighting "from the distillation paper")."""
    if prediction_type == "epsilon":
        return F.mse_loss(output.float(), noise.float())
    alpha_t = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (alpha_t / (1 - alpha_t) * F.mse_loss(output, clean, reduction="none")).mean()


def _save_pipeline(out: Path, unet, noise_scheduler, ema_model) -> None:
    """The script's final save: the pipeline into the output folder, EMA weights copied in."""
    from diffusers import DDPMPipeline

    if ema_model is not None:
        ema_model.store(unet.parameters())
        ema_model.copy_to(unet.parameters())
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(str(out))
    if ema_model is not None:
        ema_model.restore(unet.parameters())


def train_unconditional(
    out: Path,
    *,
    use_ema: bool = True,
    prediction_type: str = "epsilon",
    steps: int = 4,
    checkpointing_steps: int = 2,
    lr_warmup_steps: int = 1,
    log_with: str | None = None,
    project: str = "train_unconditional",
    config: dict | None = None,
    skip_lr: Collection[int] = (),
) -> dict:
    """train_unconditional.py's loop on a tiny UNet (batches of 3 random images in [-1, 1]);
    with ``log_with``, trackers started as ``init_trackers(project, config)`` (the script: its
    own name, no config) and ``lr`` logged at every step but those in ``skip_lr``.

    Returns {"saved": {step: {"raw", "ema", "optimizer"}}, "final": {"raw", "ema"},
    "lrs": {step: the rate after that step, as the script logs it}}."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    acc = _accelerator(out, log_with)
    model = tiny_unet(0)
    ema_model = EMAModel(
        model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
        model_cls=UNet2DModel, model_config=model.config,
    ) if use_ema else None  # fmt: skip

    def save_model_hook(models, weights, output_dir):  # the script's own hook
        if acc.is_main_process:
            if use_ema:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for m in models:
                m.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    acc.register_save_state_pre_hook(save_model_hook)
    noise_scheduler = scheduler(prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_scheduler = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=lr_warmup_steps, num_training_steps=steps
    )
    model, optimizer, lr_scheduler = acc.prepare(model, optimizer, lr_scheduler)
    if log_with:
        acc.init_trackers(project, config=config)
    names = [n for n, _ in model.named_parameters()]
    gen, saved, lrs, ema = torch.Generator().manual_seed(0), {}, {}, None
    model.train()
    for step in range(1, steps + 1):
        clean = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, 1000, (3,), generator=gen)
        output = model(noise_scheduler.add_noise(clean, noise, t), t).sample
        loss = _script_loss(noise_scheduler, prediction_type, output, clean, noise, t)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        logs = {"loss": loss.detach().item(), "step": step}
        if use_ema:
            ema_model.step(model.parameters())
            ema = dict(zip(names, [p.clone() for p in ema_model.shadow_params]))
            logs["ema_decay"] = ema_model.cur_decay_value
        if step % checkpointing_steps == 0:
            acc.save_state(str(out / f"checkpoint-{step}"))
            saved[step] = _snapshot(model, optimizer, ema=ema)
        lrs[step] = lr_scheduler.get_last_lr()[0]
        acc.log(logs if step in skip_lr else {**logs, "lr": lrs[step]}, step=step)
    acc.end_training()
    unet = acc.unwrap_model(model).eval()
    final = _snapshot(unet, optimizer, ema=ema)
    _save_pipeline(out, unet, noise_scheduler, ema_model)
    _reset_accelerate()
    return {"saved": saved, "final": final, "lrs": lrs}


def train_lora(
    out: Path, config: dict, *, checkpointing_steps: int = 2, latent_shape=(2, 4, 8, 8)
) -> dict:
    """train_text_to_image_lora.py's loop: the adapter of ``tests.inputs.test_lora.lora_unet`` on the
    frozen base UNet of ``tests.diffusion_refs.make_sd_run``, trained on random latents and text
    states for ``config["max_train_steps"]`` steps with ``config``'s rate, schedule and
    ``snr_gamma``. Returns {"saved": {step: {"raw" (adapter weights), "optimizer"}}, "final",
    "lrs": {step: the rate after that step}}."""
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from tests.diffusion_refs import MAX_LEN, TEXT_DIM
    from tests.inputs.test_lora import lora_unet

    acc = _accelerator(out, "tensorboard")
    unet = lora_unet(11)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)  # unet.requires_grad_(False), then add_adapter

    def save_model_hook(models, weights, output_dir):  # the script's own hook
        if acc.is_main_process:
            layers = None
            for model in models:
                layers = get_peft_model_state_dict(model)
                weights.pop()
            StableDiffusionPipeline.save_lora_weights(
                save_directory=output_dir, unet_lora_layers=layers, safe_serialization=True
            )

    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=config["learning_rate"])
    steps = int(config["max_train_steps"])
    lr_scheduler = get_scheduler(
        config["lr_scheduler"], optimizer=optimizer,
        num_warmup_steps=config["lr_warmup_steps"], num_training_steps=steps,
    )  # fmt: skip
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    acc.register_save_state_pre_hook(save_model_hook)
    acc.init_trackers("text2image-fine-tune", config=config)
    noise_scheduler = scheduler()
    gamma = config["snr_gamma"]
    lora_names = [n for n, p in unet.named_parameters() if p.requires_grad]
    gen, saved, lrs = torch.Generator().manual_seed(0), {}, {}
    unet.train()
    for step in range(1, steps + 1):
        latents = torch.randn(latent_shape, generator=gen)
        states = torch.randn(latent_shape[0], MAX_LEN, TEXT_DIM, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (latent_shape[0],), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, states, return_dict=False)[0]
        snr = compute_snr(noise_scheduler, t)
        weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
        loss = F.mse_loss(pred.float(), noise.float(), reduction="none")
        loss = (loss.mean(dim=[1, 2, 3]) * weights).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(lora_layers, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        acc.log({"train_loss": loss.item()}, step=step)
        adapter = {n: p.detach().clone() for n, p in unet.named_parameters() if n in lora_names}
        if step % checkpointing_steps == 0:
            acc.save_state(str(out / f"checkpoint-{step}"))
            saved[step] = {"raw": adapter, "optimizer": copy.deepcopy(optimizer.state_dict())}
        lrs[step] = lr_scheduler.get_last_lr()[0]
    acc.end_training()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(acc.unwrap_model(unet)))
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out), unet_lora_layers=layers, safe_serialization=True
    )
    _reset_accelerate()
    return {"saved": saved, "final": {"raw": adapter}, "lrs": lrs}


def adam_scale(model: torch.nn.Module, state: dict, names: list[str] | None = None):
    """1 / (sqrt(v / (1 - β2^step)) + eps) from an optimizer ``state_dict`` of AdamW over
    ``names`` (default: every parameter of ``model``, in order), flattened: [p]."""
    names = names or [n for n, _ in model.named_parameters()]
    group = state["param_groups"][0]
    beta2, eps = group["betas"][1], group["eps"]
    out = []
    for pos, _ in enumerate(names):
        entry = state["state"][pos]
        v = entry["exp_avg_sq"].double() / (1 - beta2 ** float(entry["step"]))
        out.append((1 / (v.sqrt() + eps)).reshape(-1))
    return torch.cat(out)


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` with the named parameters in ``weights`` copied in (in place), eval mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    return model.eval()
