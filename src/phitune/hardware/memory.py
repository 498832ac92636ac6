"""Peak memory and compute of a LoRA training step, from a model's config alone.

The API the planner (`phitune plan`), the training pre-flight and `--gradient_checkpointing auto` use:

    shape = model_shape(config)                       # transformers config -> ModelShape (meta device, no weights)
    est = estimate_memory(shape, lora, batch_size, seq_len, checkpointing,
                          weights_dtype, compute_dtype, device, quantize=None, attention=None,
                          answer_fraction=1.0)      # -> Estimate
    est.total_bytes, est.parts                        # parts: {"weights", "lora + AdamW", "activations", ...}
    est.loading, est.loading_dominates                # bytes held while loading; whether that is the peak
    fits(est, capacity_bytes)                         # total within 90% of capacity
    s = suggest(shape, lora, batch_size, accumulation, seq_len, checkpointing, capacity_bytes, ...)
    s.text  # "use --batch_size 2 --gradient_accumulation_steps 8: same effective batch, ~X GiB" (None if nothing fits)
    flops_per_token(shape, n_lora, seq_len, checkpointing, answer_fraction)
    rows_per_example(method)                          # sequences one example puts in a batch: 2 for dpo/orpo pairs
    device_memory(device) -> (bytes available, description)
    preflight(config, lora, batch_size, accumulation, longest, checkpointing, weights_dtype, compute_dtype,
              device, capacity_bytes=None) -> warning text or None   # what `phitune train` prints before step 1
    train_estimate(config, lora, batch_size, longest, checkpointing, weights_dtype, compute_dtype, device)
                                                      # -> the Estimate that pre-flight checks

`lora` is a config.LoraArgs (targets are resolved on the meta model exactly as training resolves them) or an
int: the trainable parameter count, with every linear layer of each decoder block taken as a target.
`device` is "cuda", "mps" or "cpu"; dtypes are torch dtypes (compute_dtype None: compute in the weights' dtype).

How the estimate is made: weights are counted from the model built on the `meta` device (no memory, no
download); the LoRA state is 16 bytes per trainable parameter (fp32 weight, gradient, two AdamW moments);
activations are the tensors autograd keeps for backward, counted op by op for one decoder layer (norm inputs
in fp32, each LoRA layer's (dropped) input, q/k/v and the attention output, the attention probabilities where
the path keeps them, the MLP's activation inputs), times the layers (with checkpointing: one layer input per
layer plus one layer recomputed at a time), plus the backward's gradient buffers and the loss head's chunk
buffers. The layer counts follow the code paths phitune trains with on each device (CPU: bf16 fused LoRA
layers and bf16 attention for sequences up to 512 tokens; CUDA: PEFT's LoRA and SDPA). The peak is the
process's runtime (CPU) plus the larger of that step and loading: on CPU every weight is loaded in fp32
before the fused layers cast theirs to bf16, which for full-size Phi-2 at short lengths is the larger
(10.4 GiB of fp32 weights against ~6 GiB trained with). docs/planning.md states how far the estimate is
from measured peaks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from phitune.hardware.backends import (
    CPU_ATTENTION_MAX_LEN as CPU_EAGER_MAX_LEN,  # CPU runs this short keep attention probabilities
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from phitune.config import LoraArgs

GIB = 2 ** 30
# What the process holds beyond the tensors it keeps: freed forward/backward temporaries the allocator keeps
# for reuse, as a multiple of the activation bytes, plus a fixed share during the steps (autograd, thread
# pools, kernel scratch). CPU: fitted to resident-memory peaks of tiny and demo models on the development CPU
# (glibc malloc; docs/planning.md). CUDA and MPS: the caching allocator's own figures, not measured here.
SLACK = {"cpu": (1.6, 35 * 2 ** 20), "cuda": (1.15, 0), "mps": (1.3, 0)}
# The process itself before any weights: Python, torch, transformers, the tokenizer and the encoded data
# (anonymous resident memory of `phitune plan` / `phitune train` on the development CPU, 0.26-0.30 GiB).
# GPUs: the allocator's measure does not see it.
RUNTIME = {"cpu": 280 * 2 ** 20, "cuda": 0, "mps": 0}
HEAD_CHUNK = {"cpu": 256, "cuda": 2048, "mps": 2048}  # loss.CPU_CHUNK / loss.CHUNK
# Sequences a training example puts through the model: a preference pair (DPO, ORPO) is its chosen and its
# rejected answer in one forward, so a micro-batch of B pairs holds 2B rows.
ROWS_PER_EXAMPLE = {"sft": 1, "dpo": 2, "orpo": 2}


def rows_per_example(method: str | None) -> int:
    """Rows one example of a `--method` run puts in a micro-batch (1 for sft, 2 for dpo/orpo pairs)."""
    return ROWS_PER_EXAMPLE.get(method or "sft", 1)


@dataclass
class ModelShape:
    """What memory and compute depend on, read from a config on the meta device."""
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int            # key/value width (kv heads x head dim)
    vocab: int
    params: int            # every parameter
    layer_linears: dict    # short name -> (in, out) for one decoder layer's nn.Linear modules
    head_params: int       # LM head parameters (0 extra memory when tied to the embeddings)
    tied: bool
    meta_model: object = field(default=None, repr=False)

    @property
    def matmul_params(self) -> int:
        """Parameters that a token meets in a matmul: decoder linears plus the LM head."""
        return self.layers * sum(i * o for i, o in self.layer_linears.values()) + self.vocab * self.hidden


def model_shape(config: PretrainedConfig) -> ModelShape:
    """Build `config`'s model on the meta device (no memory, no weights) and read its shape."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer0 = model.get_decoder().layers[0]
    linears = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
               for name, m in layer0.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(model_type=config.model_type, layers=config.num_hidden_layers, hidden=config.hidden_size,
                      intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
                      heads=heads, kv_dim=kv_heads * head_dim, vocab=config.vocab_size,
                      params=sum(p.numel() for p in model.parameters()), layer_linears=linears,
                      head_params=0 if head is None else head.weight.numel(), tied=tied, meta_model=model)


def lora_targets(shape: ModelShape, lora: LoraArgs | int) -> tuple[list[str], int, int]:
    """(short names of one layer's targeted linears, layers with adapters, trainable parameter count)."""
    if isinstance(lora, int):
        return list(shape.layer_linears), shape.layers, lora
    from phitune.models import adapters
    targets = adapters.select_targets(shape.meta_model, lora.target_modules, lora.layers)
    short = list(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))
    n_layers = len({adapters._LAYER_RE.search(f".{t}.").group(1) for t in targets
                    if adapters._LAYER_RE.search(f".{t}.")}) or shape.layers
    per_target = {s: lora.lora_r * sum(shape.layer_linears.get(s, (0, 0))) +
                  (shape.layer_linears.get(s, (0, 0))[1] if lora.use_dora else 0) for s in short}
    trainable = sum(per_target[t.rsplit(".", 1)[-1]] for t in targets)
    return short, n_layers, trainable


@dataclass
class Estimate:
    """Estimated peak bytes of one training step, by part."""
    parts: dict
    batch_size: int
    seq_len: int
    checkpointing: bool
    device: str
    trainable: int
    loading: int = 0  # bytes held while loading, beyond the runtime: the weights before any cast, LoRA weights

    @property
    def total_bytes(self) -> int:
        """The estimated peak, in bytes: the runtime plus the larger of loading and the training step (the sum
        of the other parts)."""
        step = sum(v for k, v in self.parts.items() if k != "runtime")
        return int(self.parts.get("runtime", 0) + max(step, self.loading))

    @property
    def loading_dominates(self) -> bool:
        """True when the peak is reached while loading, not in the step."""
        return self.loading > sum(v for k, v in self.parts.items() if k != "runtime")

    @property
    def total_gib(self) -> float:
        """total_bytes in GiB."""
        return self.total_bytes / GIB

    def describe(self) -> str:
        """Each part and the total in GiB, one line."""
        text = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        if self.loading_dominates:
            text += f"; while loading {self.loading / GIB:.2f}"
        return text + f" (GiB); total {self.total_gib:.2f}"


def _nbytes(dtype: torch.dtype) -> int:
    return 2 if dtype in (torch.bfloat16, torch.float16) else 4


def estimate_memory(shape: ModelShape, lora: LoraArgs | int, batch_size: int, seq_len: int, checkpointing: bool,
                    weights_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", quantize: str | None = None, attention: str | None = None,
                    answer_fraction: float = 1.0, lora_dropout: float | None = None, rows_per_example: int = 1
                    ) -> Estimate:
    """Estimated peak memory of one micro-batch (batch_size x seq_len tokens) forward + backward + AdamW step.

    attention: "eager" (probabilities kept, T x T per head) or "sdpa" (only the log-sum-exp kept); default:
    what phitune uses on `device` for this length. answer_fraction: share of positions that reach the loss head.
    rows_per_example: sequences per example (2 for a DPO/ORPO pair: batch_size pairs are 2 x batch_size rows).
    """
    device = getattr(device, "type", device)
    short, lora_layers, trainable = lora_targets(shape, lora)
    if lora_dropout is not None:
        dropout = lora_dropout
    else:
        dropout = 0.05 if isinstance(lora, int) else lora.lora_dropout  # 0.05: LoraArgs' default
    a = _nbytes(compute_dtype or weights_dtype)        # bytes of a compute-dtype activation element
    # residual stream: follows the weights; fp32 when quantized (PEFT's k-bit preparation upcasts the rest)
    rb = _nbytes(weights_dtype) if not quantize else 4
    d, f, L, V = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    n = batch_size * rows_per_example * seq_len
    fused_cpu = device == "cpu" and a == 2 and not quantize  # phitune's fused bf16 LoRA layers (cpu_lora.py)
    if attention is None:
        attention = "eager" if device == "cpu" and seq_len <= CPU_EAGER_MAX_LEN else "sdpa"

    # ---- weights
    linear_params = shape.layers * sum(i * o for i, o in shape.layer_linears.values())
    target_params = lora_layers * sum(i * o for s, (i, o) in shape.layer_linears.items() if s in short)
    other = shape.params - linear_params
    # NF4 + double-quantized absmax is ~0.52 bytes/param, int8 1; prepare_model_for_kbit_training casts every
    # other parameter (embeddings, head, norms) to fp32
    if quantize == "4bit":
        weights = linear_params * 0.516 + other * 4
    elif quantize == "8bit":
        weights = linear_params * 1.0 + other * 4
    else:
        wb = _nbytes(weights_dtype)
        weights = shape.params * wb
        if fused_cpu:  # the fused layers keep their frozen weights in bf16, and the head gets a bf16 copy
            weights += target_params * (2 - wb) + (V * d * 2 if wb == 4 else 0)
    # While loading, every weight is in the master dtype: the fused layers cast theirs down only afterwards
    # (fp32 Phi-2 on CPU: 10.4 GiB loaded, 5.9 GiB trained with)
    loading = (weights if quantize else shape.params * _nbytes(weights_dtype)) + trainable * 4

    # ---- one decoder layer's saved tensors, bytes per token
    per_target_in = {s: shape.layer_linears[s][0] for s in short if s in shape.layer_linears}
    lora_in = 0.0
    for width in per_target_in.values():
        if dropout > 0:  # each LoRA layer keeps its own dropped copy of the input (+ where it was dropped)
            lora_in += width * (a + (0.41 if fused_cpu else 1))
    if dropout == 0:  # without dropout the LoRA layers reading one input share it: norm outputs, o/down inputs
        lora_in += a * (d * 2 + (d if any(w == d for w in per_target_in.values()) else 0))
    norms = 4 * d * (1 if shape.model_type == "phi" else 2)  # fp32 inputs kept by LayerNorm/RMSNorm
    qkv = a * (d + 2 * shape.kv_dim)  # q, k, v as attention keeps them
    if attention != "eager":
        qkv += a * d  # SDPA also keeps its output
    if shape.model_type == "phi":
        qkv += a * (d + shape.kv_dim)  # partial rotary: rotated halves concatenated back (copies)
    if attention == "eager":
        probs = shape.heads * seq_len * (a if device == "cpu" and a == 2 else (4 + a if a == 2 else 4))
    else:
        probs = shape.heads * 4  # log-sum-exp
    if shape.model_type == "phi":
        mlp = a * f * 4  # gelu_new's elementwise ops keep fc1's output, x/2, tanh(...) and 1 + tanh(...)
    else:
        mlp = a * f * 3  # gate, act(gate) and up, kept by the activation and the product
    layer = (lora_in + norms + qkv + probs + mlp) * (lora_layers / L) + \
        (norms + qkv + probs + mlp) * (1 - lora_layers / L)
    if checkpointing:
        saved = n * L * rb * d + n * layer  # one input per layer, one layer recomputed at a time
    else:
        saved = n * L * layer + n * rb * d
    # backward's own buffers: gradients of the residual stream and of the widest intermediate in flight
    grads = n * (3 * rb * d + 2 * a * max(f, d))
    # loss head: hidden rows of trained positions and their gradient, one chunk of logits (fp32 + compute copy)
    answers = max(1, int(n * answer_fraction))
    chunk = min(answers, HEAD_CHUNK.get(device, 2048))
    head = answers * d * 2 * a + chunk * V * (4 + (a if a != 4 else 0))
    factor, fixed = SLACK.get(device, SLACK["cuda"])
    slack = (factor - 1) * (saved + grads + head) + fixed
    parts = {"weights": weights, "lora + AdamW": trainable * 16, "activations": saved, "backward buffers": grads,
             "loss head": head, "allocator": slack, "runtime": RUNTIME.get(device, 0)}
    return Estimate(parts={k: int(v) for k, v in parts.items()}, batch_size=batch_size, seq_len=seq_len,
                    checkpointing=checkpointing, device=device, trainable=trainable, loading=int(loading))


def fits(estimate: Estimate, capacity_bytes: int | None, margin: float = 0.9) -> bool:
    """True when the estimate is within `margin` of the memory the device has."""
    return capacity_bytes is not None and estimate.total_bytes <= margin * capacity_bytes


@dataclass
class Suggestion:
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    estimate: Estimate

    @property
    def text(self) -> str:
        """The flags to use, as a sentence for a warning."""
        flags = f"--batch_size {self.batch_size} --gradient_accumulation_steps {self.gradient_accumulation_steps}"
        if self.estimate.checkpointing:
            flags += " --gradient_checkpointing"
        return f"use {flags}: same effective batch, ~{self.estimate.total_gib:.1f} GiB"


def suggest(shape: ModelShape, lora: LoraArgs | int, batch_size: int, accumulation: int, seq_len: int,
            checkpointing: bool, capacity_bytes: int | None, margin: float = 0.9, **kw: Any) -> Suggestion | None:
    """The first setting with the same effective batch that fits: smaller micro-batches first, then
    checkpointing. Returns a Suggestion, or None when even one example per micro-batch does not fit."""
    effective = batch_size * accumulation
    sizes = [b for b in range(batch_size, 0, -1) if effective % b == 0]
    for ckpt in dict.fromkeys([checkpointing, True]):
        for b in sizes:
            est = estimate_memory(shape, lora, b, seq_len, ckpt, **kw)
            if fits(est, capacity_bytes, margin):
                return Suggestion(b, effective // b, ckpt, est)
    return None


def flops_per_token(shape: ModelShape, trainable: int, seq_len: int, checkpointing: bool,
                    answer_fraction: float = 1.0) -> float:
    """Training FLOPs per token: forward 2N, backward 2N (input gradients only: the base is frozen), one more
    forward 2N with checkpointing; attention 4 L T d per pass; the head only on trained positions."""
    decoder = shape.matmul_params - shape.vocab * shape.hidden
    passes = 3 if checkpointing else 2
    attn = 4 * shape.layers * seq_len * shape.hidden
    return passes * 2 * decoder + passes * attn + 6 * trainable + answer_fraction * 4 * shape.vocab * shape.hidden


def device_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes a run can use on this device, a description): CUDA total, MPS's recommended maximum, CPU RAM
    available. PHITUNE_AVAILABLE_MEMORY (e.g. 6GiB) overrides the figure."""
    import os
    device = getattr(device, "type", device)
    forced = os.environ.get("PHITUNE_AVAILABLE_MEMORY")
    if forced:
        return parse_bytes(forced), f"{device}, {forced} (PHITUNE_AVAILABLE_MEMORY)"
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return total, f"{torch.cuda.get_device_name(0)}, {total / GIB:.0f} GiB"
    if device == "mps":
        total = torch.mps.recommended_max_memory()
        return total, f"Apple GPU (MPS), {total / GIB:.0f} GiB usable"
    import psutil
    vm = psutil.virtual_memory()
    return vm.available, f"CPU, {vm.available / GIB:.1f} GiB RAM available of {vm.total / GIB:.1f}"


def parse_bytes(text: str | int) -> int:
    """'6GiB', '512MiB', '1.5g' or a plain number of bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))


def train_estimate(config: PretrainedConfig, lora: LoraArgs | int, batch_size: int, longest: int,
                   checkpointing: bool, weights_dtype: torch.dtype, compute_dtype: torch.dtype | None,
                   device: torch.device | str, quantize: str | None = None, rows_per_example: int = 1) -> Estimate:
    """The estimate `phitune train`'s pre-flight checks: its longest micro-batch, every position trained."""
    kw = dict(weights_dtype=weights_dtype, compute_dtype=compute_dtype, device=getattr(device, "type", device),
              quantize=quantize, rows_per_example=rows_per_example)
    return estimate_memory(model_shape(config), lora, batch_size, longest, checkpointing, **kw)


def preflight(config: PretrainedConfig, lora: LoraArgs | int, batch_size: int, accumulation: int, longest: int,
              checkpointing: bool, weights_dtype: torch.dtype, compute_dtype: torch.dtype | None,
              device: torch.device | str, capacity_bytes: int | None = None, quantize: str | None = None,
              rows_per_example: int = 1) -> str | None:
    """A warning with a fitting suggestion when the run's estimated peak is beyond 90% of the device's memory;
    None when it fits (or the device's memory is unknown). rows_per_example: 2 for DPO/ORPO pairs."""
    device = getattr(device, "type", device)
    if capacity_bytes is None:
        try:
            capacity_bytes, _ = device_memory(device)
        except (ImportError, RuntimeError, AttributeError):
            return None
    try:
        est = train_estimate(config, lora, batch_size, longest, checkpointing, weights_dtype, compute_dtype, device,
                             quantize, rows_per_example)
    except Exception:  # an architecture transformers cannot build from its config alone: no estimate, no block
        return None
    if fits(est, capacity_bytes):
        return None
    kw = dict(weights_dtype=weights_dtype, compute_dtype=compute_dtype, device=device, quantize=quantize,
              rows_per_example=rows_per_example)
    s = suggest(model_shape(config), lora, batch_size, accumulation, longest, checkpointing, capacity_bytes, **kw)
    fix = s.text if s else "lower --max_length, or use --quantize 4bit on CUDA"
    rows = f"{batch_size} pairs = {batch_size * rows_per_example} rows" if rows_per_example > 1 else f"{batch_size}"
    return (f"warning: this run needs about {est.total_gib:.1f} GiB at its longest batch ({rows} x {longest} "
            f"tokens) and {device} has {capacity_bytes / GIB:.1f} GiB; {fix}")
