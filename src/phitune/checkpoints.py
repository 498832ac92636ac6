"""Checkpoints that a crash cannot corrupt: written to a temporary directory, then renamed into place.

checkpoint-STEP/ holds the adapter weights, optimizer, scheduler, RNG and the loop state (step, best
validation loss, patience). state.json is written last, so a directory without it is incomplete.
"""
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from phitune.errors import PhituneError

_NAME = re.compile(r"checkpoint-(\d+)$")


def atomic_dir(final, write):
    """Call write(tmp_dir), then rename tmp_dir to `final` (replacing an older one)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def rng_state():
    """The random generators' state (dropout draws), to be saved with the step it belongs to."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save(output_dir, step, model, optimizer, scheduler, state, keep, rng=None):
    """checkpoint-STEP/; `rng` is the RNG state as of the end of that step (default: now)."""
    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng or rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    path = Path(output_dir) / f"checkpoint-{step}"
    atomic_dir(path, write)
    for old in complete(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def complete(output_dir):
    """Complete checkpoint directories, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _NAME.search(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def partial(output_dir):
    return sorted(p for p in Path(output_dir).glob(".checkpoint-*.tmp"))


def latest(output_dir):
    for p in partial(output_dir):
        print(f"phitune: ignoring incomplete checkpoint {p} (interrupted while saving)", file=sys.stderr)
    done = complete(output_dir)
    return done[-1] if done else None


def load(path, model, optimizer, scheduler):
    """Restore a checkpoint into model/optimizer/scheduler; returns the saved loop state."""
    path = Path(path)
    try:
        weights = load_file(path / "adapter_model.safetensors")
        state = json.loads((path / "state.json").read_text())
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
    except Exception as e:  # corrupt or truncated files: name the checkpoint, keep the traceback out
        raise PhituneError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0][:160]}); "
                           f"delete it to resume from the one before") from None
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise PhituneError(f"{path}: checkpoint does not fit this model/LoRA configuration "
                           f"(unexpected {result.unexpected_keys[:3]}); resume with the same settings")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
