"""Experiment trackers (`--report_to tensorboard trackio wandb mlflow`) through Accelerate's tracker classes.

The interface the training loop uses, and all it uses:

    trackers = Trackers.start(cfg, accelerator)   # cfg: RunConfig; accelerator: Accelerator or None
    trackers.log({"loss": 1.9, "lr": 2e-4}, step)  # numbers only; non-finite and None values are skipped
    trackers.finish()

Only the main process talks to trackers; on other ranks (and with no --report_to) every call does nothing.
Runs stay on this machine unless the user says otherwise: TensorBoard writes event files under
output_dir/tensorboard/RUN_NAME, wandb runs in offline mode (WANDB_MODE=offline unless set; `wandb sync`
uploads later), MLflow writes to output_dir/mlruns unless MLFLOW_TRACKING_URI is set, and trackio keeps its
local database (it uploads only when given a Space).
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from phitune.config import RunConfig

# tracker -> (module that must import, pip package to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
            "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_installed(names: list[str]) -> None:
    """Raise PhituneError naming the package for each asked-for tracker that is not installed."""
    missing = [(n, PACKAGES[n][1]) for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        pkgs = " ".join(p for _, p in missing)
        raise PhituneError(f"report_to: {', '.join(n for n, _ in missing)} needs the package(s) {pkgs}, which "
                           f"are not installed; pip install {pkgs} (or pip install 'phitune[{missing[0][0]}]'), "
                           f"or drop it from --report_to")


def hparams(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The run configuration as flat str/int/float/bool values, which every tracker accepts."""
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value))
        elif value is None:
            value = "none"
        out[key] = value
    return out


class Trackers:
    """The started trackers of one run; empty (and falsy) when none was asked for."""

    def __init__(self, trackers: Any = ()) -> None:
        self.trackers = list(trackers)

    @classmethod
    def start(cls, cfg: RunConfig, accelerator: Accelerator | None = None, logging_dir: str | Path | None = None
              ) -> Trackers:
        """Start every tracker in cfg.train.report_to and store the run configuration in each.

        logging_dir defaults to cfg.train.output_dir. Returns an object whose log()/finish() do nothing when
        no tracker was asked for or this is not the main process.
        """
        names = list(dict.fromkeys(cfg.train.report_to or []))
        if not names or (accelerator is not None and not accelerator.is_main_process):
            return cls()
        check_installed(names)
        out = Path(logging_dir or cfg.train.output_dir or ".")
        run_name = cfg.train.run_name or out.resolve().name or "phitune"
        trackers = []
        for name in names:
            tracker = _make(name, run_name, out)
            try:
                tracker.start()
                tracker.store_init_configuration(hparams(cfg))
            except Exception as e:  # a tracker's own failure (login, server) should say which tracker
                raise PhituneError(f"report_to: {name} could not start: {str(e).splitlines()[0] if str(e) else e!r}"
                                   ) from None
            trackers.append(tracker)
        return cls(trackers)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log the numeric values of `metrics` at optimizer step `step`."""
        if not self.trackers:
            return
        values = {k: float(v) for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        """Close every tracker (flushes their files or runs); later log() calls do nothing."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __bool__(self) -> bool:
        return bool(self.trackers)


def _make(name: str, run_name: str, out: Path) -> Any:
    from accelerate import tracking
    if name == "tensorboard":
        return tracking.TensorBoardTracker(run_name, out / "tensorboard")
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        return tracking.WandBTracker("phitune", dir=str(out), name=run_name)
    if name == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").resolve().as_uri())
        return tracking.MLflowTracker(experiment_name="phitune", run_name=run_name)
    if name == "trackio":
        return tracking.TrackioTracker("phitune", name=run_name)
    raise PhituneError(f"report_to: unknown tracker {name}")
