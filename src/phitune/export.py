"""`phitune export`: merge an adapter into its base and write one GGUF file for llama.cpp (and an Ollama Modelfile).

The file carries the tokenizer, the special ids and the chat template phitune trained with, so llama.cpp
prompts the model the way training did and stops where the tuned model stops. Nothing is compiled: the
`gguf` package writes the file. Written under a temporary name and renamed at the end, so a failed export
leaves nothing behind.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from phitune.config import add_arguments, settings
from phitune.config_commands import ExportArgs
from phitune.errors import PhituneError
from phitune.exporting import gguf_writer
from phitune.exporting.gguf_file import atomic_write, check_output, write_gguf, write_text
from phitune.exporting.merge import merge_adapter
from phitune.exporting.ollama import modelfile
from phitune.models import loading as models
from phitune.models.adapters import base_model_name, check_base, read_adapter_meta

if TYPE_CHECKING:
    import argparse

GROUPS = {"export": ExportArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the export options to the subcommand parser p."""
    add_arguments(p, GROUPS)


def run_name(adapter_path: str | Path) -> str:
    """The name the exported model carries: the training run's output_dir name for a run's final_adapter/ or
    best_adapter/, else the adapter folder's own name."""
    path = Path(adapter_path).resolve()
    return path.parent.name if path.name in ("final_adapter", "best_adapter") and path.parent.name else path.name


def main(args: argparse.Namespace) -> int:
    """Run `phitune export` with parsed args; returns the exit code."""
    args = settings(args, GROUPS)
    out = Path(args.output).expanduser()
    check_output(out)
    mf = out.with_name("Modelfile")
    if args.format == "ollama" and mf.exists() and not args.force:
        raise PhituneError(f"{mf} already exists (another export's instructions?); pass --force to replace it, or "
                           f"export into another folder")
    meta = read_adapter_meta(args.adapter_path)
    base_name = base_model_name(args.adapter_path, meta, args.model)
    config = models.load_config(base_name, args.trust_remote_code)
    arch = gguf_writer.arch_for(config)  # refuse early
    check_base(args.adapter_path, meta, config, base_name)
    if args.format == "lora":
        from phitune.exporting.gguf_lora import write_lora_gguf
        n = write_lora_gguf(out, args.adapter_path, config, atomic_write)
        print(f"GGUF LoRA written to {out} ({arch}, {n} adapted matrices, f32)")
        print(f"  llama.cpp:  llama-cli -m BASE.gguf --lora {out} -cnv   (BASE.gguf: a GGUF of {base_name})")
        return 0
    merged, tokenizer, template, base_name, ids, before = merge_adapter(args.adapter_path, args.model,
                                                                              args.trust_remote_code)
    merged = merged.to(torch.float32).eval()
    with torch.no_grad():
        diff = max(float((merged(input_ids=torch.tensor([x])).logits - b).abs().max()) for x, b in zip(ids, before))
    if not diff <= args.tolerance:
        raise PhituneError(f"merged logits differ from base+adapter by {diff:.2e} (> {args.tolerance:.1e}); "
                           f"nothing was written")
    # The Modelfile is derived before anything is written, so a template it cannot express writes nothing.
    mf_text = modelfile(out.name, template, args.adapter_path) if args.format == "ollama" else None
    names = write_gguf(out, merged, tokenizer, template, args.outtype, name=run_name(args.adapter_path))
    size = out.stat().st_size / 2**20
    print(f"check: max |logit difference| merged vs base+adapter = {diff:.2e}; every tensor read back within "
          f"{args.outtype} precision")
    print(f"GGUF written to {out} ({arch}, {args.outtype}, {len(names)} tensors, {size:.1f} MiB)")
    print(f"  llama.cpp:  llama-cli -m {out} -cnv        (the chat template and stop tokens are in the file)")
    if mf_text is not None:
        try:
            write_text(mf, mf_text)
        except PhituneError:
            out.unlink()  # half an Ollama export is none: the GGUF goes too
            raise
        print(f"Ollama Modelfile written to {mf}")
        print(f"  ollama:     cd {out.parent} && ollama create {out.stem} -f Modelfile && ollama run {out.stem}")
    sys.stdout.flush()
    return 0
