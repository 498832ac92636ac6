"""`phitune merge`: fold an adapter into its base and save a plain transformers model, checked logit by logit."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phitune import adapters, models
from phitune.checkpoints import atomic_dir
from phitune.config import add_arguments, settings
from phitune.config_commands import MergeArgs
from phitune.errors import PhituneError

if TYPE_CHECKING:
    import argparse

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from phitune.templates import Template

CHECK_PROMPTS = ["Hello, how are you?", "Write one sentence about the sea.", "1 2 3 4 5"]


GROUPS = {"merge": MergeArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the merge options to the subcommand parser p."""
    add_arguments(p, GROUPS)


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
    from phitune.templates import Template
    template = Template.from_meta(tokenizer, meta["template"]) if meta.get("template") else Template(tokenizer)
    base = models.load_model(base_name, torch.float32, trust_remote_code).eval()
    tuned = adapters.load_adapter(base, adapter_path, meta).eval()
    ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
    with torch.no_grad():
        before = [tuned(input_ids=torch.tensor([x])).logits for x in ids]
        merged = tuned.merge_and_unload()
    return merged, tokenizer, template, base_name, ids, before


def main(args: argparse.Namespace) -> int:
    """Run `phitune merge` with parsed args: write the merged model and check its logits; returns the exit code."""
    args = settings(args, GROUPS)
    merged, tokenizer, template, base_name, ids, before = merge_adapter(args.adapter_path, args.model,
                                                                        args.trust_remote_code)
    out = Path(args.output_dir)

    def write(tmp: Path) -> None:
        merged.to(getattr(torch, args.dtype)).save_pretrained(tmp, safe_serialization=True)
        if template.kind == "chat":
            tokenizer.chat_template = template.to_meta()["chat_template"]
        tokenizer.save_pretrained(tmp)
        gen_cfg = merged.generation_config
        gen_cfg.eos_token_id = template.stop_token_ids()
        gen_cfg.pad_token_id = tokenizer.pad_token_id
        gen_cfg.save_pretrained(tmp)
        (tmp / "phitune_merge.json").write_text(json.dumps({"base": base_name, "adapter": str(args.adapter_path),
                                                            "template": template.to_meta()}, indent=2))
    atomic_dir(out, write)
    # The check loads what was written, with plain transformers, as a user would.
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = max(float((reloaded(input_ids=torch.tensor([x])).logits - b).abs().max()) for x, b in zip(ids, before))
    scale = max(float(b.abs().max()) for b in before)
    tol = args.tolerance if args.dtype == "float32" else max(args.tolerance, 0.02 * scale)
    print(f"merged model written to {out}")
    print(f"check: max |logit difference| merged vs base+adapter over {len(ids)} prompts = {diff:.2e} "
          f"(tolerance {tol:.1e}, logits up to {scale:.1f})")
    if not diff <= tol:
        raise PhituneError(f"merged logits differ from base+adapter by {diff:.2e} (> {tol:.1e}); the merged model "
                           f"in {out} should not be trusted")
    return 0
