"""Checkpoints that a crash cannot corrupt: written to a temporary directory, then renamed into place.

checkpoint-STEP/ holds the adapter weights, optimizer, scheduler, RNG and the loop state (step, best
validation loss, patience). state.json is written last, so a directory without it is incomplete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from phitune.errors import PhituneError

_NAME = re.compile(r"checkpoint-(\d+)$")


def atomic_dir(final: str | Path, write: Callable[[Path], None]) -> None:
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


def rng_state() -> dict[str, Any]:
    """The random generators' state (dropout draws), to be saved with the step it belongs to."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any], keep: int,
         rng: dict[str, Any] | None = None) -> Path:
    """checkpoint-STEP/; `rng` is the RNG state as of the end of that step (default: now)."""
    def write(tmp: Path) -> None:
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


def complete(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _NAME.search(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def partial(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories left half-written by an interrupted save."""
    return sorted(p for p in Path(output_dir).glob(".checkpoint-*.tmp"))


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in output_dir, or None; warns about incomplete ones."""
    for p in partial(output_dir):
        print(f"phitune: ignoring incomplete checkpoint {p} (interrupted while saving)", file=sys.stderr)
    done = complete(output_dir)
    return done[-1] if done else None


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0) -> dict[str, Any]:
    """Restore a checkpoint into model/optimizer/scheduler; returns the saved loop state.

    Each process gets back its own RNG state (`rng.pt` holds one per process under "ranks"; checkpoints
    without it have only process 0's, which every process then takes)."""
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
    ranks = rng.get("ranks") or [rng]
    rng = ranks[rank] if rank < len(ranks) else ranks[0]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
