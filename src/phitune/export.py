"""`phitune export`: merge an adapter into its base and write one GGUF file for llama.cpp (and an Ollama Modelfile).

The file carries the tokenizer, the special ids and the chat template phitune trained with, so llama.cpp
prompts the model the way training did and stops where the tuned model stops. Nothing is compiled: the
`gguf` package writes the file. Written under a temporary name and renamed at the end, so a failed export
leaves nothing behind.
"""
from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from phitune import gguf_writer, merge, models
from phitune.adapters import base_model_name, check_base, read_adapter_meta
from phitune.config import add_arguments, settings
from phitune.config_commands import ExportArgs
from phitune.errors import PhituneError

if TYPE_CHECKING:
    import argparse

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from phitune.templates import Template

# Largest |dequantized - merged| / max|merged| per tensor the read-back check accepts, per out type.
READBACK_TOL = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2, "q4_0": 0.15}


GROUPS = {"export": ExportArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the export options to the subcommand parser p."""
    add_arguments(p, GROUPS)


def _check_output(path: Path) -> None:
    """Fail before any slow work when the file cannot be written where asked."""
    if path.suffix != ".gguf":
        raise PhituneError(f"--output {path}: name the file with a .gguf extension")
    if path.is_dir():
        raise PhituneError(f"--output {path}: is a directory; give a file name such as {path / 'model.gguf'}")
    parent = path.parent
    if not parent.is_dir():
        raise PhituneError(f"--output {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PhituneError(f"--output {path}: directory {parent} is not writable")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path), then rename onto `path`; the temporary file is removed on any failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise PhituneError(f"--output {path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_gguf(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: Template,
               outtype: str, name: str = "phitune model") -> list[str]:
    """Write `model` (a merged transformers model) as a GGUF file at `path`; returns the written tensor names."""
    import gguf
    arch = gguf_writer.arch_for(model.config)
    names = []

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        gguf_writer.add_hparams(w, model.config, arch, outtype)
        gguf_writer.add_tokenizer(w, tokenizer, model.config, template)
        for tname, data in gguf_writer.tensors(model, arch):
            names.append(tname)
            encoded, raw = gguf_writer.encode_tensor(tname, data, outtype)
            w.add_tensor(tname, encoded, raw_dtype=raw)
        gguf_writer.write_out(w)
        check_readback(tmp, gguf_writer.tensors(model, arch), outtype)
    _atomic_write(Path(path), write)
    return names


def check_readback(path: str | Path, originals: Iterable[tuple[str, np.ndarray]], outtype: str) -> None:
    """Read the file back with the gguf reader and compare every tensor with the weights it came from
    (`originals`: (name, array) pairs, as gguf_writer.tensors yields them)."""
    import gguf
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    seen = set()
    for name, want in originals:
        t = reader.get(name)
        if t is None:
            raise PhituneError(f"export check: tensor {name} is missing from the written file")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        scale = float(np.abs(want).max()) or 1.0
        err = float(np.abs(got.astype(np.float32) - want).max()) / scale
        if err > READBACK_TOL[outtype] + (1e-3 if t.tensor_type == gguf.GGMLQuantizationType.F16 else 0):
            raise PhituneError(f"export check: tensor {t.name} reads back with relative error {err:.2e} "
                               f"(> {READBACK_TOL[outtype]:.0e} for {outtype})")
        seen.add(name)
    extra = set(reader) - seen
    if extra:
        raise PhituneError(f"export check: unexpected tensors in the written file: {', '.join(sorted(extra))}")


# ---------------------------------------------------------------- Ollama

_S, _U, _A = "\u2063SYS\u2063", "\u2063USER\u2063", "\u2063ANSWER\u2063"


def _split(text: str, *marks: str) -> list[str]:
    out = []
    for m in marks:
        head, sep, text = text.partition(m)
        if not sep:
            raise PhituneError("export: cannot derive an Ollama template from this chat template")
        out.append(head)
    return out + [text]


def ollama_template(template: Template) -> str:
    """A Go template for Ollama that renders one turn exactly as phitune's template does."""
    plain = copy.copy(template)
    plain.system_prompt = None
    pre_sys, sys_to_user, post_user = _split(plain.render_prompt([{"role": "system", "content": _S},
                                                                  {"role": "user", "content": _U}]), _S, _U)
    pre_user, post_user_nosys = _split(plain.render_prompt([{"role": "user", "content": _U}]), _U)
    if post_user_nosys != post_user:
        raise PhituneError("export: the chat template ends a user turn differently with and without a system "
                           "prompt; an Ollama template cannot express that")
    if template.kind == "chat":
        turn = [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}]
        full = plain._render_chat(turn, False)
        answer_pre, answer_post = _split(full[len(plain.render_prompt(turn[:1])):], _A)
    else:
        answer_pre, answer_post = " ", template.eos_token
    for piece in (pre_sys, sys_to_user, pre_user, post_user, answer_pre, answer_post):
        if "{{" in piece or '"""' in piece:
            raise PhituneError("export: the chat template's text contains '{{' or '\"\"\"', which a Modelfile "
                               "cannot carry")
    # Text between the prompt and the answer (Phi-2's space) belongs to the answer's tokens in training, so it
    # is written only for past answers: the model generates it itself, as it learned to.
    answer_pre = "{{ if .Response }}" + answer_pre + "{{ end }}" if answer_pre else ""
    return ("{{ if .System }}" + pre_sys + "{{ .System }}" + sys_to_user + "{{ else }}" + pre_user + "{{ end }}"
            "{{ .Prompt }}" + post_user + answer_pre + "{{ .Response }}" + answer_post)


def modelfile(gguf_name: str, template: Template, source: str | Path) -> str:
    """An Ollama Modelfile for gguf_name: FROM, the prompt TEMPLATE, SYSTEM and stop PARAMETERs; source: the adapter."""
    lines = [f"# Written by phitune export from {source}.",
             "# Create the model with: ollama create NAME -f Modelfile   (run it: ollama run NAME)",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{ollama_template(template)}"""']
    if template.system_prompt:
        if '"""' in template.system_prompt:
            raise PhituneError('export: the system prompt contains \'"""\', which a Modelfile cannot carry')
        lines.append(f'SYSTEM """{template.system_prompt}"""')
    lines += [f'PARAMETER stop "{t}"' for t in template.stop_tokens if t]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command

def main(args: argparse.Namespace) -> int:
    """Run `phitune export` with parsed args; returns the exit code."""
    args = settings(args, GROUPS)
    out = Path(args.output).expanduser()
    _check_output(out)
    meta = read_adapter_meta(args.adapter_path)
    base_name = base_model_name(args.adapter_path, meta, args.model)
    config = models.load_config(base_name, args.trust_remote_code)
    arch = gguf_writer.arch_for(config)  # refuse early
    check_base(args.adapter_path, meta, config, base_name)
    if args.format == "lora":
        from phitune.gguf_lora import write_lora_gguf
        n = write_lora_gguf(out, args.adapter_path, config, _atomic_write)
        print(f"GGUF LoRA written to {out} ({arch}, {n} adapted matrices, f32)")
        print(f"  llama.cpp:  llama-cli -m BASE.gguf --lora {out} -cnv   (BASE.gguf: a GGUF of {base_name})")
        return 0
    merged, tokenizer, template, base_name, ids, before = merge.merge_adapter(args.adapter_path, args.model,
                                                                              args.trust_remote_code)
    merged = merged.to(torch.float32).eval()
    with torch.no_grad():
        diff = max(float((merged(input_ids=torch.tensor([x])).logits - b).abs().max()) for x, b in zip(ids, before))
    if not diff <= args.tolerance:
        raise PhituneError(f"merged logits differ from base+adapter by {diff:.2e} (> {args.tolerance:.1e}); "
                           f"nothing was written")
    # The Modelfile is derived before anything is written, so a template it cannot express writes nothing.
    mf_text = modelfile(out.name, template, args.adapter_path) if args.format == "ollama" else None
    names = write_gguf(out, merged, tokenizer, template, args.outtype, name=Path(args.adapter_path).resolve().name)
    size = out.stat().st_size / 2**20
    print(f"check: max |logit difference| merged vs base+adapter = {diff:.2e}; every tensor read back within "
          f"{args.outtype} precision")
    print(f"GGUF written to {out} ({arch}, {args.outtype}, {len(names)} tensors, {size:.1f} MiB)")
    print(f"  llama.cpp:  llama-cli -m {out} -cnv        (the chat template and stop tokens are in the file)")
    if mf_text is not None:
        mf = out.with_name("Modelfile")

        def write(tmp):
            tmp.write_text(mf_text, encoding="utf-8")
        _atomic_write(mf, write)
        print(f"Ollama Modelfile written to {mf}")
        print(f"  ollama:     cd {out.parent} && ollama create {out.stem} -f Modelfile && ollama run {out.stem}")
    sys.stdout.flush()
    return 0
