"""`phitune merge`: fold an adapter into its base and save a plain transformers model, checked logit by logit."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phitune.config import add_arguments, settings
from phitune.config_commands import MergeArgs
from phitune.errors import PhituneError
from phitune.exporting.merge import merge_adapter
from phitune.training.checkpoints import atomic_dir

if TYPE_CHECKING:
    import argparse

GROUPS = {"merge": MergeArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the merge options to the subcommand parser p."""
    add_arguments(p, GROUPS)


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
