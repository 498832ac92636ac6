"""`phitune train`: LoRA fine-tuning with a plain loop on Accelerate.

setup (train_setup.py: data, device plan, model + LoRA, optimizer, resume) -> fit (train_loop.py: the
loop) -> finish (train_setup.py: best weights, final_adapter/, summary).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.config import RunConfig, add_arguments, build_config, load_yaml
from phitune.errors import PhituneError
from phitune.training.loop import fit
from phitune.training.setup import finish, setup

if TYPE_CHECKING:
    import argparse


def add_parser(parser: argparse.ArgumentParser) -> None:
    """Add every training option (model, lora, data, train groups) to the subcommand parser."""
    add_arguments(parser)


def main(args: argparse.Namespace) -> int | None:
    """Run `phitune train` with parsed args; with --num_processes > 1, relaunch and return its exit code."""
    parts = build_config(args)
    cfg = RunConfig(**parts)
    if not cfg.data.dataset_path:
        raise PhituneError("--dataset_path is required (or dataset_path: in the --config file): the data to train on")
    if not cfg.train.output_dir:
        raise PhituneError("--output_dir is required (or output_dir: in the --config file): where the adapter and "
                           "checkpoints go")
    given = set(vars(args)) | (set(load_yaml(args.config)) if getattr(args, "config", None) else set())
    resolve_base(cfg, model_given="model" in given)
    if cfg.train.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch(cfg.train.num_processes, args._argv)
    train(cfg)


def resolve_base(cfg: RunConfig, model_given: bool) -> None:
    """With --adapter_path and no --model, train on the base model the adapter records."""
    if cfg.model.adapter_path and not model_given:
        from phitune.models import adapters
        meta = adapters.read_adapter_meta(cfg.model.adapter_path)
        cfg.model.model = adapters.base_model_name(cfg.model.adapter_path, meta)


def launch(n: int, given: list[str]) -> int:
    """Re-run this command as N data-parallel processes through torch.distributed (gloo on CPU, NCCL on CUDA)."""
    import socket
    import subprocess
    argv, skip = [], False
    for a in given:  # drop --num_processes N: each worker is one process
        if skip:
            skip = False
        elif a == "--num_processes":
            skip = True
        elif not a.startswith("--num_processes="):
            argv.append(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "phitune", *argv]
    print(f"phitune: launching {n} processes", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def train(cfg: RunConfig) -> Path:
    """Run one fine-tuning job described by a RunConfig; returns the final adapter directory."""
    run = setup(cfg)
    try:
        stop_reason = fit(run)
    except KeyboardInterrupt:
        run.log(f"interrupted at step {run.progress.step}; continue with:\n  {_resume_command()}")
        raise
    return finish(run, stop_reason)


def _resume_command():
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    prog = "phitune" if Path(sys.argv[0]).name in ("phitune", "__main__.py") else f"python {sys.argv[0]}"
    return f"{prog} {shlex.join(argv)} --resume"
