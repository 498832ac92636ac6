"""Rows of a decoding batch that compute what they would compute alone, whatever else the batch holds.

A greedy answer from `serve`, `compare` or `eval` must not depend on which other requests shared its
batch. In a plain batched forward two things make a row's numbers depend on its neighbours:

- Attention over a left-padded KV cache: the kernel sees the row's tokens at other offsets, so its blocked
  and vectorised sums round differently (in bf16 enough to change a greedy token in 2 to 4 of 8 answers on
  the demo model). Here attention runs row by row on each row's own tokens. On a CPU it runs in fp32:
  PyTorch's fp32 SDPA decodes a batch several times faster than its bf16 one (for 8 rows of the demo model,
  per layer: 8 separate fp32 rows 164 us, one bf16 batch 362 us).
- LoRA: PEFT runs a mixed batch adapter by adapter, and a batch of one adapter through another path. Here
  every LoRA layer keeps all adapters' A and B side by side (each adapter's scaling folded into its B) and
  adds every row's update with one pair of matmuls whose columns are masked per row, so each row's sums
  are the same whichever adapters its neighbours use; a row of the base gets an exact zero.

The linear layers themselves treat rows independently in bf16 and int8 (and in fp32 up to rounding:
PyTorch's fp32 CPU matmul takes another path below 4 rows) for as many rows as a decoding step has. A
prefill of several prompts has many more rows (prompts x tokens), and there oneDNN may sum in another order:
on a CPU with AMX and 2 threads, the demo model's bf16 down projection (1536 -> 576) gives a row other
bits with 160 to 256 rows than alone (2 of 6 greedy answers of a mixed batch changed). So on a CPU each
prompt's tokens go through the linear layers by themselves, as the prompt alone does (see per_row).
tests/test_engine.py checks the end result: every row of a mixed batch gives the answer it gives alone.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

NAME = "phitune_rows"
_local = threading.local()


class Batch:
    """What one forward pass needs to know about its rows: where each row's tokens start in the padded
    cache, which adapter (None: the base) each row uses, and the fewest rows a matmul may see (see
    exact_rows)."""

    def __init__(self, starts: list, adapters: Optional[list], min_rows: int = 1):
        self.starts = starts
        self.adapters = adapters
        self.min_rows = min_rows
        self.any_adapter = adapters is not None and any(a is not None for a in adapters)
        self._masks = {}
        self._alone = {}

    def alone(self, i: int) -> Batch:
        """Row i as a batch of its own (what the row computes when it is the only request)."""
        if i not in self._alone:
            self._alone[i] = Batch([0], None if self.adapters is None else [self.adapters[i]], self.min_rows)
        return self._alone[i]

    def mask(self, layer: RowLoraLinear, lead: torch.Size, rows: int) -> torch.Tensor:
        """(rows, columns): 1 where a column belongs to the adapter of the row's batch row, 0 for fill rows.

        `lead` is the shape the rows were flattened from: (batch, tokens), or (batch * tokens,) where a
        model flattens them itself (Qwen2-MoE's shared expert). Shared by same-layout layers."""
        key = (layer.layout, tuple(lead), rows)
        m = self._masks.get(key)
        if m is None:
            m = torch.zeros(len(self.adapters), 1, layer.a.shape[0], dtype=layer.a.dtype)
            for i, name in enumerate(self.adapters):
                if name in layer.cols:
                    m[i, 0, layer.cols[name]] = 1
            n, batch = lead.numel(), len(self.adapters)
            if n % batch:
                raise RuntimeError(f"a LoRA layer got {n} rows for a batch of {batch}")
            m = m.expand(batch, n // batch, m.shape[-1]).reshape(-1, m.shape[-1])  # rows are batch-major
            m = torch.cat([m, m.new_zeros(rows - len(m), m.shape[-1])])
            m = self._masks[key] = m.to(layer.a.device)
        return m


@contextmanager
def batch(starts: list, adapters: Optional[list] = None, min_rows: int = 1) -> Iterator[Batch]:
    """Run the forward passes inside as a batch of rows (see Batch)."""
    previous = getattr(_local, "batch", None)
    _local.batch = Batch(starts, adapters, min_rows)
    try:
        yield _local.batch
    finally:
        _local.batch = previous


def current() -> Optional[Batch]:
    return getattr(_local, "batch", None)


def per_row(layer: nn.Module, x: torch.Tensor, b: Optional[Batch]) -> Optional[torch.Tensor]:
    """A CPU prefill of several prompts, (rows, tokens, in) -> (rows, tokens, out): each row's own tokens (its
    left padding left out) through `layer` inside a batch of that row alone, so the matmuls see exactly the
    shapes, and give exactly the bits, of the prompt alone; padding positions get zeros. None for anything
    else (one row, one token per row, flattened tokens, other devices): the layer runs the rows together."""
    if b is None or x.dim() != 3 or x.shape[1] < 2 or len(b.starts) != x.shape[0] or x.shape[0] < 2 \
            or x.device.type != "cpu":
        return None
    out = None
    for i, start in enumerate(b.starts):
        if start >= x.shape[1]:
            continue
        _local.batch = b.alone(i)
        try:
            y = layer(x[i:i + 1, start:])
        finally:
            _local.batch = b
        if out is None:
            out = y.new_zeros(x.shape[0], x.shape[1], y.shape[-1])
        out[i, start:] = y[0]
    return out


# ---------------------------------------------------------------------------------------------- attention
def attention(module, query, key, value, attention_mask, **kwargs):
    """Row-by-row SDPA inside a `batch()`; plain SDPA (with the model's mask) everywhere else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    b = current()
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if (b is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or (window and kv_len > window) or (q_len > 1 and q_len != kv_len) or len(b.starts) != query.shape[0]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    if query.device.type == "cpu":
        query, key, value = query.float(), key.float(), value.float()
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], value.shape[-1])
    for i, start in enumerate(b.starts):
        q_from = start if q_len > 1 else 0  # a prompt's queries carry the same left padding as its keys
        o, _ = sdpa_attention_forward(module, query[i:i + 1, :, q_from:], key[i:i + 1, :, start:],
                                      value[i:i + 1, :, start:], None, is_causal=q_len > 1, **kwargs)
        out[i, q_from:] = o[0]
    return out.to(dtype), None


def install_attention(model: nn.Module) -> bool:
    """Use row-by-row attention in this model's engine batches (SDPA models on a CPU); True when installed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type != "cpu":
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True


# ---------------------------------------------------------------------------------------------- matmuls
def _fill_to(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, in) with zero rows added up to `rows`."""
    return x if len(x) >= rows else torch.cat([x, x.new_zeros(rows - len(x), x.shape[1])])


class PadRows(nn.Module):
    """A linear layer that never multiplies fewer than the batch's min_rows rows (zero rows fill in).

    It always hands its layer a 2-D input: the last position of a batch of prompts (what the LM head gets
    after a prefill) is a strided 3-D view, and F.linear on that expands the weight to one copy per row
    and runs a batched matmul (for the demo model's head and 8 prompts: a 1.4 GB copy, 250 ms)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.lead = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = current()
        lead = x.shape[:-1]
        y = per_row(self, x, b)
        self.lead = lead  # top_logits reads it: which of the flattened rows are last positions
        if y is not None:
            return y
        x = x.reshape(-1, x.shape[-1])
        n = len(x)
        y = self.inner(_fill_to(x, b.min_rows) if b is not None else x)
        return y[:n].reshape(*lead, y.shape[-1])


def exact_rows(kind: str) -> Optional[int]:
    """Fewest rows from which this machine's matmul of `kind` gives every row the same bits however many rows
    there are and wherever the row sits; None where no such number exists. Measured once per process.

    Kinds: int8 (`_weight_int8pack_mm`), bf16 and fp32 (`F.linear`), packed-bf16 and packed-fp32 (oneDNN
    with a packed weight, packed.py). On the development machine: int8 from 1 row; bf16 and both packed
    kinds from 2 rows (one row takes a matrix-vector path that sums in another order); fp32 through MKL
    never: rows in the last, partial block of 4 are computed by another kernel. A last-bit difference can
    flip a greedy token."""
    if kind not in _EXACT:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(60, 1536, generator=g)
        if kind == "int8":
            w, scale = torch.randint(-127, 128, (576, 1536), generator=g, dtype=torch.int8), torch.rand(576) / 100
            x, scale = x.bfloat16(), scale.bfloat16()
            f = lambda t: torch.ops.aten._weight_int8pack_mm(t, w, scale)  # noqa: E731
        else:
            dtype = torch.float32 if kind.endswith("fp32") else torch.bfloat16
            w, x = (torch.randn(576, 1536, generator=g) / 40).to(dtype), x.to(dtype)
            f = _matmul(w) if kind.startswith("packed-") else lambda t: nn.functional.linear(t, w)
        full = f(x)
        _EXACT[kind] = next((k for k in (1, 2, 4) if all(
            torch.equal(f(x[i:i + m]), full[i:i + m]) for m in range(k, 10) for i in range(0, 60 - m + 1, m))), None)
    return _EXACT[kind]


_EXACT: dict = {}


# ---------------------------------------------------------------------------------------------- LoRA
class RowLoraLinear(nn.Module):
    """A base linear layer plus the LoRA update of each row's own adapter (all adapters' A and B stacked)."""

    def __init__(self, peft_layer: nn.Module, names: list):
        super().__init__()
        self.base_layer = peft_layer.get_base_layer()
        a_parts, b_parts, self.cols, at = [], [], {}, 0
        for name in names:
            if name not in peft_layer.lora_A:
                continue
            a = peft_layer.lora_A[name].weight.detach()
            a_parts.append(a)
            b_parts.append(peft_layer.lora_B[name].weight.detach() * peft_layer.scaling[name])
            self.cols[name] = slice(at, at + a.shape[0])
            at += a.shape[0]
        self.register_buffer("a", torch.cat(a_parts))  # (all ranks, in)
        self.register_buffer("b", torch.cat(b_parts, dim=1))  # (out, all ranks)
        self.layout = (tuple((n, s.start, s.stop) for n, s in self.cols.items()), self.a.dtype)
        self._a, self._b = _matmul(self.a), _matmul(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = current()
        y = per_row(self, x, b)
        if y is not None:
            return y
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        n = len(x)
        y = self.base_layer(_fill_to(x, b.min_rows) if b is not None else x)[:n]
        if b is not None and b.any_adapter:
            x = _fill_to(x if x.dtype == self.a.dtype else x.to(self.a.dtype), b.min_rows)
            h = self._a(x) * b.mask(self, lead, len(x))
            y = y + self._b(h)[:n].to(y.dtype)
        return y.reshape(*lead, y.shape[-1])


def _packs(weight: torch.Tensor) -> bool:
    from phitune.generation import packed
    return weight.device.type == "cpu" and packed.available(weight.dtype)


def _matmul(weight: torch.Tensor):
    """x -> x @ weight.T: oneDNN with the weight packed once on a CPU (packed.py), F.linear elsewhere."""
    if _packs(weight):
        w = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return lambda x: nn.functional.linear(x, weight)


class RowLora:
    """Swaps a model's layers for row-exact ones while an engine decodes (install) and back (remove).

    Installed: LoRA layers become RowLoraLinear (adapters only apply inside `batch(..., adapters)`) and
    other linear layers PadRows. Removed: the model is as loaded, and PEFT's set_adapter / disable_adapter
    work as usual (eval's loss uses them)."""

    def __init__(self, model: nn.Module, names: list):
        from peft.tuners.lora import LoraLayer

        from phitune.generation.int8 import Int8Linear
        from phitune.generation.packed import PackedLinear
        self.swaps = []  # (parent, attribute, original layer, replacement)
        kinds = set()
        lora_inside = set()
        on_cpu = next(model.parameters()).device.type == "cpu"
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                lora_inside.update(f"{name}.{n}" for n, _ in module.named_modules() if n)
                self.swaps.append((name, module, RowLoraLinear(module, names)))
                kinds.add(_kind(module.get_base_layer()))
                lora = next(iter(module.lora_A.values())).weight
                kinds.add(("packed-" if _packs(lora) else "") + ("fp32" if lora.dtype == torch.float32 else "bf16"))
            elif isinstance(module, (nn.Linear, Int8Linear, PackedLinear)) and name not in lora_inside:
                self.swaps.append((name, module, PadRows(module)))
                kinds.add(_kind(module))
        self.swaps = [(model.get_submodule(n.rpartition(".")[0]) if "." in n else model, n.rpartition(".")[2], old, new)
                      for n, old, new in self.swaps]
        # Measured for this machine's CPU kernels; on a GPU no row count is claimed (and none is padded to).
        rows = [exact_rows(k) for k in kinds] if on_cpu else [None]
        self.exact = None not in rows  # every row's answer is the one it gets alone
        self.min_rows = max([r for r in rows if r] or [1])
        self.installed = False

    @staticmethod
    def supports(peft_model: nn.Module) -> bool:
        """Plain LoRA on linear layers only: no DoRA or other variants, no LoRA biases, no LoRA on embeddings."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        from phitune.generation.int8 import Int8Linear
        from phitune.generation.packed import PackedLinear
        try:
            from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save, trainable tokens
        except ImportError:
            AuxiliaryTrainingWrapper = ()
        for module in peft_model.modules():
            if AuxiliaryTrainingWrapper and isinstance(module, AuxiliaryTrainingWrapper):
                return False  # a whole module replaced per adapter: PEFT's own paths pick the right copy
            if not isinstance(module, LoraLayer):
                continue
            if not isinstance(module, LoraLinear) or getattr(module, "lora_variant", None) or \
                    not isinstance(module.get_base_layer(), (nn.Linear, Int8Linear, PackedLinear)):
                return False
            if any(layer.bias is not None for layer in module.lora_B.values()) or any(module.use_dora.values()):
                return False
        return True

    def install(self) -> None:
        """Put the row-exact layers in."""
        if not self.installed:
            for parent, child, _, mine in self.swaps:
                setattr(parent, child, mine)
            self.installed = True

    def remove(self) -> None:
        """Put the model's own layers back."""
        if self.installed:
            for parent, child, peft_layer, _ in self.swaps:
                setattr(parent, child, peft_layer)
            self.installed = False


def _kind(layer: nn.Module) -> str:
    from phitune.generation.int8 import Int8Linear
    from phitune.generation.packed import PackedLinear
    if isinstance(layer, Int8Linear):
        return "int8"
    if isinstance(layer, PackedLinear):
        return "packed-" + ("fp32" if layer.dtype == torch.float32 else "bf16")
    return "fp32" if layer.weight.dtype == torch.float32 else "bf16"
