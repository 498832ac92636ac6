"""Write one GGUF file from a merged model and read every tensor back before it is kept.

The file carries the tokenizer, the special ids and the chat template phitune trained with, so llama.cpp
prompts the model the way training did and stops where the tuned model stops. Nothing is compiled: the
`gguf` package writes the file. Written under a temporary name and renamed at the end, so a failed export
leaves nothing behind.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phitune.errors import PhituneError
from phitune.exporting import gguf_writer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from phitune.data.templates import Template

# Largest |dequantized - merged| / max|merged| per tensor the read-back check accepts, per out type.
READBACK_TOL = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2, "q4_0": 0.15}


def check_output(path: Path) -> None:
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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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
    atomic_write(Path(path), write)
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
