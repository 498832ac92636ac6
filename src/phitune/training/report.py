"""What a person sees of a run: metrics.jsonl, loss.png, the summary table and the next commands."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics.jsonl; on resume, rows past the resumed step are dropped (they will be redone)."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.rows = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, **row: Any) -> None:
        """Append one row (floats rounded to 6 digits) to the log and to metrics.jsonl."""
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def plot(self, ylabel: str = "loss (nats per answer token)") -> None:
        """Draw train and validation loss against the step into loss.png beside metrics.jsonl."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.with_name("loss.png"), dpi=100)
        plt.close(fig)


def summary(rows: list[tuple[str, Any]]) -> str:
    """A two-column table as text."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def ppl(loss: float) -> float:
    """Perplexity for a mean loss in nats, capped at exp(50) so a diverged run does not overflow."""
    return math.exp(min(loss, 50))
