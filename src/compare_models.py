"""Seed-compatible entry point: `python src/compare_models.py --adapter_path ...` = `phitune compare ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phitune.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["compare", *sys.argv[1:]])
