"""LoRA targets (presets, explicit names, layer ranges), attaching, and the self-describing adapter directory."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from phitune import __version__
from phitune.errors import PhituneError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from phitune.config import LoraArgs

# Per-architecture module names (see docs/layer-guide.md).
FAMILIES = {
    "phi": {"attention": ["q_proj", "k_proj", "v_proj", "dense"], "mlp": ["fc1", "fc2"], "qv": ["q_proj", "v_proj"]},
    "phi3": {"attention": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"], "qv": ["qkv_proj"]},
    "llama": {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
              "qv": ["q_proj", "v_proj"]},
}
# Model types whose decoder layers use Llama's module names.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3"}
PRESETS = ("all", "attention", "mlp", "qv")
ADAPTER_META = "phitune.json"
META_VERSION = 1

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def family(model_type: str) -> str | None:
    """The target-name family of a config.model_type (phi, phi3, llama...), or None when unknown."""
    if model_type in FAMILIES:
        return model_type
    return "llama" if model_type in LLAMA_LIKE else None


def linear_modules(model: nn.Module) -> dict[str, int | None]:
    """Full names of the decoder's nn.Linear modules, with their layer index (None outside layers)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            m = _LAYER_RE.search(f".{name}.")
            out[name] = int(m.group(1)) if m else None
    return out


def parse_layers(spec: str | int | None, n_layers: int) -> list[int]:
    """'0-15,30' -> [0..15, 30], checked against the model's layer count."""
    if spec is None or str(spec).strip() in ("", "all"):
        return list(range(n_layers))
    chosen = set()
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise PhituneError(f"layers: cannot read '{part}'; use indices and ranges such as 0-15,30")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_layers:
            raise PhituneError(f"layers: '{part}' is outside this model's layers 0-{n_layers - 1}")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def _preset_names(fam: str | None, preset: str, short_names: set[str]) -> list[str]:
    if fam is not None:
        names = FAMILIES[fam]
        return names["attention"] + names["mlp"] if preset == "all" else names[preset]
    # Unknown architecture: every linear layer, split by the usual naming habits.
    if preset == "all":
        return sorted(short_names)
    attn = sorted(n for n in short_names if re.search(r"attn|attention|q_|k_|v_|o_|qkv|query|key|value", n))
    if preset == "attention":
        return attn
    if preset == "mlp":
        return sorted(set(short_names) - set(attn))
    return [n for n in attn if re.search(r"q|v", n)][:2] or attn


def select_targets(model: PreTrainedModel, target_modules: list[str], layers: str | None = None) -> list[str]:
    """Resolve presets/names and a layer spec into the exact list of module names to adapt.

    Raises PhituneError naming the model's real module names when a name matches nothing.
    """
    modules = linear_modules(model)
    short = {name.rsplit(".", 1)[-1] for name in modules}
    n_layers = model.config.num_hidden_layers
    keep_layers = set(parse_layers(layers, n_layers))
    fam = family(model.config.model_type)
    wanted = []
    for item in target_modules:
        names = _preset_names(fam, item, short) if item in PRESETS else [item]
        wanted += [n for n in names if n not in wanted]
    missing = [n for n in wanted if n not in short]
    if missing:
        raise PhituneError(f"target_modules: {', '.join(missing)} matches no linear layer in this "
                           f"{model.config.model_type} model; its layers are: {', '.join(sorted(short))} "
                           f"(or a preset: {', '.join(PRESETS)})")
    targets = [name for name, layer in modules.items()
               if name.rsplit(".", 1)[-1] in wanted and (layer is None or layer in keep_layers)]
    if not targets:
        raise PhituneError(f"target_modules/layers: no module left to adapt in layers {layers}")
    return targets


def attach_lora(model: PreTrainedModel, lora_args: LoraArgs, seed: int | None = None
                ) -> tuple[PeftModel, list[str]]:
    """Wrap `model` with LoRA adapters on the selected modules; returns (peft_model, target names)."""
    from peft import LoraConfig, get_peft_model
    targets = select_targets(model, lora_args.target_modules, lora_args.layers)
    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=targets, use_dora=lora_args.use_dora, use_rslora=lora_args.use_rslora,
                        bias="none", task_type="CAUSAL_LM")
    if seed is not None:
        torch.manual_seed(seed)
    return get_peft_model(model, config), targets


def trainable_summary(model: nn.Module, targets: list[str]) -> tuple[list[str], int]:
    """Lines a person reads before training: what matched and how much will train."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    by_short = {}
    layers = set()
    for name in targets:
        by_short[name.rsplit(".", 1)[-1]] = by_short.get(name.rsplit(".", 1)[-1], 0) + 1
        m = _LAYER_RE.search(f".{name}.")
        if m:
            layers.add(int(m.group(1)))
    mods = ", ".join(f"{k} x{v}" for k, v in by_short.items())
    span = f"layers {min(layers)}-{max(layers)} ({len(layers)} of them)" if layers else "no numbered layers"
    return [f"LoRA targets: {len(targets)} modules in {span}: {mods}",
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"], trainable


# ---------------------------------------------------------------- adapter directory

def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, meta: dict[str, Any]
                 ) -> None:
    """Write adapter weights (safetensors), tokenizer and phitune.json into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(path)
    (path / ADAPTER_META).write_text(json.dumps({"phitune_version": __version__, "format_version": META_VERSION,
                                                 **meta}, indent=2, default=str) + "\n")


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """Read and check an adapter directory's phitune.json; errors name the directory and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise PhituneError(f"{path}: adapter directory not found")
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / required).is_file():
            raise PhituneError(f"{path}: not a complete adapter directory ({required} is missing)")
    meta_file = path / ADAPTER_META
    if not meta_file.is_file():
        return {}  # a plain PEFT adapter: usable, the caller falls back to its adapter_config.json
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PhituneError(f"{meta_file}: unreadable ({e})") from None
    if meta.get("format_version", 1) > META_VERSION:
        raise PhituneError(f"{meta_file}: written by a newer phitune (format {meta['format_version']}); "
                           f"upgrade phitune to use this adapter")
    return meta


def base_model_name(path: str | Path, meta: dict[str, Any], model: str | None = None) -> str:
    """The base to load an adapter on: `model` (a --model value) if given, else the one its meta records."""
    name = model or meta.get("base", {}).get("model")
    if not name:
        raise PhituneError(f"{path}: no base model recorded; pass --model")
    return name


def check_base(path: str | Path, meta: dict[str, Any], config: PretrainedConfig, base: str = "this base") -> None:
    """Raise PhituneError when the adapter at `path` was trained on a base whose type, width or depth
    (as recorded in `meta`) differ from `config`'s; `base` names the base in the message."""
    recorded = meta.get("base", {})
    for key in ("model_type", "hidden_size", "num_hidden_layers"):
        want, have = recorded.get(key), getattr(config, key, None)
        if want is not None and want != have:
            raise PhituneError(f"{path}: adapter was trained on a base with {key}={want}, but {base} has "
                               f"{key}={have}; pass the base it was trained on with --model "
                               f"{recorded.get('model', '')}")


def load_adapter(base_model: PreTrainedModel | PeftModel, path: str | Path, meta: dict[str, Any] | None = None,
                 adapter_name: str = "default", trainable: bool = False) -> PeftModel:
    """Attach a saved adapter to `base_model`, checking that it was trained on this architecture and width;
    trainable=True keeps its LoRA weights trainable (to train it further), else they are frozen."""
    from peft import PeftModel
    meta = read_adapter_meta(path) if meta is None else meta
    check_base(path, meta, base_model.config)
    try:
        if isinstance(base_model, PeftModel):
            base_model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=trainable)
            return base_model
        return PeftModel.from_pretrained(base_model, str(path), adapter_name=adapter_name, is_trainable=trainable)
    except Exception as e:  # safetensors/PEFT raise many types for corrupt files
        raise PhituneError(f"{path}: cannot load the adapter: {str(e).splitlines()[0][:200]}") from None


def lora_shape(path: str | Path) -> dict[str, Any]:
    """The LoRA shape of a saved adapter as LoraArgs fields (lora_r, lora_alpha, lora_dropout, target_modules as
    short names, layers as a spec or None for all, use_dora, use_rslora), read from its adapter_config.json."""
    cfg_file = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PhituneError(f"{cfg_file}: unreadable ({e})") from None
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    layers = sorted({int(m.group(1)) for t in targets if (m := _LAYER_RE.search(f".{t}."))})
    layer_spec = cfg.get("layers_to_transform")
    if layer_spec is not None:
        layers = sorted([layer_spec] if isinstance(layer_spec, int) else layer_spec)
    return {"lora_r": int(cfg.get("r", 8)), "lora_alpha": float(cfg.get("lora_alpha", 8)),
            "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
            "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}) or ["all"],
            "layers": ",".join(map(str, layers)) if layers else None,
            "use_dora": bool(cfg.get("use_dora", False)), "use_rslora": bool(cfg.get("use_rslora", False))}
