"""Seed-compatible entry point: `python src/main.py --dataset_path ... --output_dir ...` = `phitune train ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phitune.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
