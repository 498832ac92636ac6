"""Fold an adapter into its base model (float32), keeping the base+adapter logits of a few prompts so
whoever writes the merged weights can check them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phitune.errors import PhituneError
from phitune.models import adapters
from phitune.models import loading as models

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from phitune.data.templates import Template

CHECK_PROMPTS = ["Hello, how are you?", "Write one sentence about the sea.", "1 2 3 4 5"]


def merge_adapter(adapter_path: str | Path, model: str | None = None, trust_remote_code: bool = False) -> tuple[
        PreTrainedModel, PreTrainedTokenizerBase, Template, str, list[list[int]], list[torch.Tensor]]:
    """Load base + adapter in float32 and fold the adapter in.

    Returns (merged model, tokenizer, template, base name, check prompt ids, base+adapter logits on them):
    the last two let a caller check whatever it writes against the unmerged model.
    """
    meta = adapters.read_adapter_meta(adapter_path)
    base_name = adapters.base_model_name(adapter_path, meta, model)
    config = models.load_config(base_name, trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    if quant and (quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)):
        raise PhituneError(f"{base_name} is stored quantized ({quant}); merging into quantized weights loses the "
                           f"adapter's precision. Dequantize it first (save it in bf16/fp32) and pass that with "
                           f"--model")
    if meta.get("training", {}).get("quantize"):
        print("phitune merge: the adapter was trained on a 4/8-bit base; merging into the full-precision base",
              file=sys.stderr)
    tokenizer = models.load_tokenizer(base_name, trust_remote_code)
    from phitune.data.templates import Template
    template = Template.from_meta(tokenizer, meta["template"]) if meta.get("template") else Template(tokenizer)
    base = models.load_model(base_name, torch.float32, trust_remote_code).eval()
    tuned = adapters.load_adapter(base, adapter_path, meta).eval()
    ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
    with torch.no_grad():
        before = [tuned(input_ids=torch.tensor([x])).logits for x in ids]
        merged = tuned.merge_and_unload()
    return merged, tokenizer, template, base_name, ids, before
