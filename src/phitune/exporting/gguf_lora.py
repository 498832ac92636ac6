"""The adapter alone as a GGUF LoRA file, for llama.cpp's `--lora` on a GGUF of the same base model.

Tensors are named after the base tensor they change (`blk.N.attn_q.weight.lora_a` / `.lora_b`);
llama.cpp adds `scale * alpha / r * B @ A` to that weight, as PEFT does. For the Llama family, B's rows
get the same q/k re-ordering as the base weights in a GGUF.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phitune.errors import PhituneError
from phitune.exporting.gguf_file import read_gguf, write_out
from phitune.exporting.gguf_writer import LAYER_NAMES, arch_for, permute_for_llamacpp

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def write_lora_gguf(path: str | Path, adapter_path: str | Path, config: PretrainedConfig,
                    write: Callable[[Path, Callable[[Path], None], Callable[[Path], None]], None]) -> int:
    """Build the GGUF LoRA for `adapter_path` (trained on a base with `config`) and read it back; callback
    style: `write` is gguf_file.atomic_write (path, write(tmp), check(tmp)). Returns the number of adapted
    matrices."""
    import gguf
    from safetensors.numpy import load_file
    arch = arch_for(config)
    adapter_path = Path(adapter_path)
    cfg = json.loads((adapter_path / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise PhituneError(f"{adapter_path}: DoRA adapters have no llama.cpp LoRA equivalent; export the merged "
                           f"model instead (--format gguf)")
    if cfg.get("modules_to_save") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise PhituneError(f"{adapter_path}: adapters with modules_to_save or per-layer ranks cannot be written as "
                           f"a llama.cpp LoRA; export the merged model instead (--format gguf)")
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(r)  # PEFT scales rsLoRA by alpha/sqrt(r); llama.cpp always by alpha/r
    names = LAYER_NAMES[arch]
    pairs = {}
    for key, value in load_file(str(adapter_path / "adapter_model.safetensors")).items():
        m = _KEY.match(key)
        if not m or m.group(2) not in names:
            raise PhituneError(f"{adapter_path}: tensor {key} has no place in a llama.cpp {arch} LoRA")
        pairs.setdefault((int(m.group(1)), names[m.group(2)]), {})[m.group(3)] = value.astype(np.float32)

    written = {}
    for (layer, name), ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]  # a: (r, n_in), b: (n_out, r)
        if arch == "llama" and name in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if name == "attn_q" else config.num_key_value_heads
            b = permute_for_llamacpp(b, heads)
        written[f"blk.{layer}.{name}.weight.lora_a"] = a
        written[f"blk.{layer}.{name}.weight.lora_b"] = b

    def build(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tname, data in written.items():
            w.add_tensor(tname, data)
        write_out(w, tmp)

    def check(tmp: Path) -> None:
        """Every tensor reads back bit for bit (f32), and nothing else is in the file."""
        back = {t.name: t for t in read_gguf(tmp).tensors}
        if set(back) != set(written):
            raise PhituneError(f"export check: {path} reads back with tensors {sorted(set(back) ^ set(written))[:4]} "
                               f"missing or extra")
        for tname, data in written.items():
            got = np.asarray(back[tname].data).reshape(data.shape)
            if not np.array_equal(got, data):
                raise PhituneError(f"export check: tensor {tname} reads back differently from the adapter")
    write(Path(path), build, check)
    return len(pairs)
