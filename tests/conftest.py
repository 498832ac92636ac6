import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Local model directories of tiny random phi, phi3 and llama models."""
    base = tmp_path_factory.mktemp("models")
    return {arch: build_model_dir(arch, base / arch) for arch in ("phi", "phi3", "llama")}


@pytest.fixture(params=["phi", "phi3", "llama"])
def arch(request):
    return request.param


def write_jsonl(path, rows):
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


MEMORISE = [{"prompt": f"Say the code for {name}", "response": f"The code for {name} is {code}."}
            for name, code in [("red", "one"), ("blue", "two"), ("green", "three"), ("gold", "four")]]


@pytest.fixture
def memorise_file(tmp_path):
    return write_jsonl(tmp_path / "memorise.jsonl", MEMORISE)


def run_cli(*argv):
    """Run `phitune ARGV` in this process; returns the exit code."""
    from phitune.cli import main
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code or 0
    return 0


@pytest.fixture(scope="session")
def memorised_adapter(tiny_models, tmp_path_factory):
    """An adapter on the tiny llama that has memorised MEMORISE (greedy answers match exactly)."""
    base = tmp_path_factory.mktemp("memorised")
    data = write_jsonl(base / "memorise.jsonl", MEMORISE)
    code = run_cli("train", "--model", tiny_models["llama"], "--dataset_path", data, "--output_dir", base / "run",
                   "--epochs", 60, "--batch_size", 4, "--gradient_accumulation_steps", 1, "--max_length", 64,
                   "--lora_r", 16, "--lora_dropout", 0.0, "--learning_rate", 3e-2, "--warmup_ratio", 0.0,
                   "--val_split", 0)
    assert code == 0
    return base / "run" / "final_adapter"


@pytest.fixture(scope="session")
def shared_models():
    """Folder of the real Phi tokenizers and configs (no weights): $PHITUNE_SHARED_MODELS, else
    <repository>/../shared/models, else /work/shared/models; the test is skipped when none exists."""
    for candidate in (os.environ.get("PHITUNE_SHARED_MODELS"), ROOT.parent / "shared" / "models",
                      "/work/shared/models"):
        if candidate and (Path(candidate) / "phi-2").is_dir():
            return Path(candidate)
    pytest.skip("the real Phi tokenizers (shared/models) are not here")
