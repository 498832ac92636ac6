"""Write one GGUF file from a merged model and read every tensor back before it is kept.

The file carries the tokenizer, the special ids and the chat template phitune trained with, so llama.cpp
prompts the model the way training did and stops where the tuned model stops. Nothing is compiled: the
`gguf` package writes the file. Written under a temporary name and renamed at the end, so a failed export
leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from phitune.errors import PhituneError
from phitune.exporting import gguf_writer

if TYPE_CHECKING:
    import gguf
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


class _NoSpace(Exception):
    """The filesystem cannot take `need` more bytes (raised before writing, or on ENOSPC while writing)."""

    def __init__(self, need: int | None) -> None:
        super().__init__(need)
        self.need = need


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**20:.2f} MB"


def _mount_of(path: Path) -> tuple[str, str]:
    """(device, mount point) of the filesystem holding `path`, as /proc/mounts names them where it can."""
    mount = path.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = "the filesystem"
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 1 and fields[1] == str(mount):
                    device = fields[0]  # the last mount on a point is the one in use
    except OSError:
        pass
    return device, str(mount)


def no_space_error(path: Path, need: int | None) -> PhituneError:
    """The message for a file that does not fit: which filesystem, how much the file needs, how much is free."""
    device, mount = _mount_of(path.parent)
    free = shutil.disk_usage(path.parent).free
    needs = f"needs {_mb(need)}, {_mb(free)} free" if need is not None else f"{_mb(free)} free"
    return PhituneError(f"--output {path}: no space left on {device} at {mount} ({needs}); nothing was written. "
                        f"Free some space there or choose another --output")


def ensure_space(path: Path, need: int) -> None:
    """Refuse before writing `need` bytes into path's directory when its filesystem has less free."""
    if shutil.disk_usage(path.parent).free < need:
        raise _NoSpace(need)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None], check: Callable[[Path], None] | None = None) -> None:
    """write(tmp_path), flush it to disk, check(tmp_path) (a read-back), then rename onto `path`.

    Nothing is left behind on any failure: no temporary file, and `path` untouched. A full filesystem is
    reported with the space the file needs (PhituneError, exit 2), never as a traceback.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)  # a filesystem may report a full disk only here
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # the rename itself
    except _NoSpace as e:
        raise no_space_error(path, e.need) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space_error(path, None) from None
        raise PhituneError(f"--output {path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    """Write a small text file (the Modelfile) the same careful way."""
    data = text.encode("utf-8")

    def write(tmp: Path) -> None:
        ensure_space(tmp, len(data))
        try:
            tmp.write_bytes(data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _NoSpace(len(data)) from None
            raise

    def check(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise PhituneError(f"export check: {path} reads back differently from what was written")
    atomic_write(path, write, check)


def planned_size(w: gguf.GGUFWriter) -> int:
    """The bytes write_out(w) writes: header, key-values, tensor infos, then each tensor aligned.
    (Follows GGUFWriter's own layout, using its value packer.)"""
    import gguf
    pack = w._pack_val
    string = gguf.GGUFValueType.STRING
    kv = sum(len(pack(k, string, add_vtype=False)) + len(pack(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
             for k, v in w.kv_data[0].items())
    infos = sum(len(pack(name, string, add_vtype=False)) + 4 + 8 * len(t.shape) + 4 + 8
                for name, t in w.tensors[0].items())
    data = sum(w.ggml_pad(t.nbytes, w.data_alignment) for t in w.tensors[0].values())
    return w.ggml_pad(24 + kv + infos, w.data_alignment) + data


def write_out(w: gguf.GGUFWriter, path: Path) -> None:
    """Write everything added to `w` (header, key-values, tensors) into `path`, its file, and close it;
    _NoSpace, before writing anything, when the filesystem cannot take the whole file."""
    need = planned_size(w)
    ensure_space(path, need)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()  # flushes: a full disk may show only here
    except BaseException as e:
        for fh in w.fout or []:
            with contextlib.suppress(OSError):
                fh.close()
        w.fout = None
        if isinstance(e, OSError) and _disk_full(e, path, need):
            raise _NoSpace(need) from None
        raise
    size = path.stat().st_size
    if size != need:  # numpy's tofile can stop short on a full disk without raising
        if _disk_full(None, path, need):
            raise _NoSpace(need)
        raise PhituneError(f"export: the file came out {size} bytes long instead of {need}; nothing was kept")


def _disk_full(error: OSError | None, path: Path, need: int) -> bool:
    """Whether a failed or short write of `need` bytes into `path` ran out of space. numpy's tofile reports a
    short write as "N requested and M written", without ENOSPC, so the free space decides."""
    if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    written = path.stat().st_size if path.exists() else 0
    return shutil.disk_usage(path.parent).free < need - written


def read_gguf(path: Path) -> gguf.GGUFReader:
    """The gguf package's reader on a file just written; a file it cannot parse is an export error."""
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise PhituneError(f"export check: the written file cannot be read back ({e}); nothing was kept") from None


def write_gguf(path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: Template,
               outtype: str, name: str = "phitune model") -> list[str]:
    """Write `model` (a merged transformers model) as a GGUF file at `path`; returns the written tensor names."""
    import gguf
    arch = gguf_writer.arch_for(model.config)
    names = []

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(gguf_writer.file_name(name, tokenizer))
        gguf_writer.add_hparams(w, model.config, arch, outtype)
        gguf_writer.add_tokenizer(w, tokenizer, model.config, template)
        for tname, data in gguf_writer.tensors(model, arch):
            names.append(tname)
            encoded, raw = gguf_writer.encode_tensor(tname, data, outtype)
            w.add_tensor(tname, encoded, raw_dtype=raw)
        write_out(w, tmp)
    atomic_write(Path(path), write, lambda tmp: check_readback(tmp, gguf_writer.tensors(model, arch), outtype))
    return names


def check_readback(path: str | Path, originals: Iterable[tuple[str, np.ndarray]], outtype: str) -> None:
    """Read the file back with the gguf reader and compare every tensor with the weights it came from
    (`originals`: (name, array) pairs, as gguf_writer.tensors yields them)."""
    import gguf
    reader = {t.name: t for t in read_gguf(Path(path)).tensors}
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
