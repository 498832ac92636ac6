"""Hardware paths for training, decided once per run and applied through one seam.

`make_plan` looks at the device, the precision and the model and says which attention, which LoRA
layer, which pre-flight and whether to checkpoint activations; `apply(model, plan)` puts that into the
model. The training loop never asks what hardware it runs on. A new backend (fused kernels for MPS
or CUDA) adds a branch here and a module of its own, imported only when its plan is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Beyond this the (T x T) attention weights kept for backward grow too large for the CPU attention paths.
CPU_ATTENTION_MAX_LEN = 512
# The run must fit in this share of the available memory for `--gradient_checkpointing auto` to turn it off.
CHECKPOINTING_MARGIN = 0.8


@dataclass
class DevicePlan:
    device: torch.device
    weights_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    attention: str = "default"  # default | eager | phitune_cpu
    lora_layer: str = "peft"  # peft | fused_cpu (one pass per layer, CPU)
    preflight: str = "disk"  # disk | disk+ram
    checkpointing: bool = True
    checkpointing_reason: str = "on"
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        """One line for the run log: device, dtypes, attention and LoRA layer paths."""
        compute = str(self.autocast_dtype or self.weights_dtype).replace("torch.", "")
        return (f"{self.device.type}, weights {str(self.weights_dtype).replace('torch.', '')}, compute {compute}, "
                f"attention {self.attention}, LoRA layer {self.lora_layer}")


def make_plan(device: torch.device, weights_dtype: torch.dtype, autocast_dtype: torch.dtype | None, quantized: bool,
              longest: int) -> DevicePlan:
    """The hardware path for a run on `device` whose longest example has `longest` tokens."""
    plan = DevicePlan(device, weights_dtype, autocast_dtype)
    if device.type == "cpu":
        plan.preflight = "disk+ram"
        cpu_bf16 = autocast_dtype == torch.bfloat16 and not quantized
        if longest <= CPU_ATTENTION_MAX_LEN:
            # For short sequences PyTorch's CPU SDPA kernels (mostly their backward) are slower than plain
            # matmul + softmax: ~30% per step on the demo model (docs/benchmarks.md); under bf16 autocast
            # phitune's own version of it saves another fifth of the step.
            plan.attention = "phitune_cpu" if cpu_bf16 else "eager"
        if not quantized:
            # PEFT's generic LoRA path spent more time in casts, dropout draws and scaling than in matmuls
            # under bf16; in fp32 the fused layer still measured 1.09x per step (docs/benchmarks.md).
            plan.lora_layer = "fused_cpu"
    return plan


def apply(model: torch.nn.Module, plan: DevicePlan) -> int:
    """Put `plan` into a PEFT model (attention, LoRA layers); returns how many LoRA layers were fused."""
    fused = 0
    if plan.attention == "phitune_cpu":
        from phitune.hardware.cpu_attention import use_cpu_attention
        try:
            use_cpu_attention(model)
        except (ValueError, KeyError):  # a model (remote code) that accepts only its own implementations
            plan.attention = "eager"
    if plan.attention == "eager":
        model.set_attn_implementation("eager")
    if plan.device.type == "cpu":
        from phitune.hardware.cpu_lora import use_fused_lora
        compute = (plan.autocast_dtype or plan.weights_dtype) if plan.lora_layer == "fused_cpu" else None
        fused = use_fused_lora(model, compute)
    return fused


def decide_checkpointing(setting: str, need_without: int | None, available: int | None) -> tuple[bool, str]:
    """(on, reason): forced by true/false; with auto, off only when the run fits without it with margin."""
    if setting in ("true", "false"):
        return setting == "true", f"{'on' if setting == 'true' else 'off'}: --gradient_checkpointing {setting}"
    if need_without is None or available is None:
        return True, "on: the available memory is unknown"
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    fits = need_without <= CHECKPOINTING_MARGIN * available
    return not fits, f"{'off' if fits else 'on'}: needs ~{gib(need_without)} without it, {gib(available)} available"
