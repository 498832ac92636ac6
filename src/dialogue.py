"""Seed-compatible entry point: `python src/dialogue.py --adapter_path ...` = `phitune chat ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phitune.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["chat", *sys.argv[1:]])
