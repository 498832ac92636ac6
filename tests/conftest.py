import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_models():
    """The real Phi tokenizer and config files (see shared_models_path)."""
    return shared_models_path()


def shared_models_path():
    """The folder of real model files (Phi tokenizers and configs, no weights): PHITUNE_SHARED_MODELS when set,
    else <repository root>/../shared/models (CI clones the repository next to shared/), else /work/shared/models.
    Missing files fail the run rather than skip it: these tests are what checks the real tokenizers."""
    if os.environ.get("PHITUNE_SHARED_MODELS"):
        candidates = [Path(os.environ["PHITUNE_SHARED_MODELS"])]
    else:
        candidates = [ROOT.parent / "shared" / "models", Path("/work/shared/models")]
    for path in candidates:
        if (path / "phi-2").is_dir() and (path / "phi-3.5-mini-instruct").is_dir():
            return path
    pytest.fail(f"the real Phi tokenizer files are missing: no phi-2/ and phi-3.5-mini-instruct/ in "
                f"{' or '.join(map(str, candidates))}; clone the repository next to shared/ or set "
                f"PHITUNE_SHARED_MODELS to the folder that holds them", pytrace=False)


def shared_model_dir(name):
    """One real model folder of shared_models_path(): phi-2 or phi-3.5-mini-instruct."""
    return shared_models_path() / name


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


RUNNER = ROOT / "tools" / "llamacpp"


@pytest.fixture(scope="session")
def llamacpp():
    """Call llama.cpp with one JSON request (see tools/llamacpp/run.mjs); installs the runner if needed."""
    if shutil.which("node") is None:
        pytest.fail("Node.js is not installed; the llama.cpp checks need it (apt-get install nodejs npm)")
    if not (RUNNER / "node_modules" / "node-llama-cpp").is_dir():
        subprocess.run(["npm", "ci", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund"],
                       cwd=RUNNER, check=True, capture_output=True, timeout=600)

    def call(request):
        # Batches of 16 tokens: on AMX CPUs llama.cpp gets q8_0/q4_0 wrong for the tiny models' 32-wide layers
        # when 32+ tokens go at once (tools/llamacpp/run.mjs); elsewhere the batch size changes no bit.
        request = {"batch": 16, **request}
        r = subprocess.run(["node", str(RUNNER / "run.mjs")], input=json.dumps(request), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)
    return call
