"""Typed run configuration. Each dataclass field is a CLI flag and a `--config` YAML key.

Precedence: dataclass default < YAML file < flags given on the command line.
"""
import argparse
import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from phitune.errors import ConfigError, PhituneError


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its --help text; extra metadata: choices, nargs, aliases, repeat, switch, required."""
    meta = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def same_as(cls: type, name: str) -> Any:
    """A new field with the default, help and checks' metadata of cls's field `name` (one option, two commands)."""
    f = cls.__dataclass_fields__[name]
    return opt(default_of(f), **f.metadata)


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (a fresh one for default_factory fields)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def at_least_one(obj: Any, *names: str) -> None:
    """Raise ConfigError for the first of the fields `names` of obj that is below 1."""
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(name, f"must be >= 1, got {getattr(obj, name)}")


@dataclass
class ModelArgs:
    model: str = opt("microsoft/phi-2", "hub id, local directory, .gguf file, or the demo alias smollm2-135m-instruct")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own Python code")
    quantize: Optional[str] = opt(None, "4bit (QLoRA: NF4, double quantization, bf16 compute) or 8bit base weights; "
                                        "CUDA only, needs bitsandbytes", choices=("4bit", "8bit"))
    precision: str = opt("auto", "auto | bf16 | fp32 | fp16: compute precision (auto: bf16 where the device "
                                 "supports it)",
                         choices=("auto", "bf16", "fp32", "fp16"))
    adapter_path: Optional[str] = opt(None, "start from this trained adapter and train it further (any --method): "
                                            "its base model (unless --model is given), template, system prompt and "
                                            "LoRA shape come from its phitune.json; --lora_* flags do not apply")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", "is empty; give a hub id, a directory, a .gguf file or smollm2-135m-instruct")


@dataclass
class LoraArgs:
    lora_r: int = opt(8, "LoRA rank: the width of the low-rank update")
    lora_alpha: float = opt(32, "LoRA scaling numerator (update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input, 0 to 1")
    target_modules: list = opt(["all"], "a preset (all, attention, mlp, qv) or module names, e.g. q_proj v_proj",
                               nargs="+")
    layers: Optional[str] = opt(None, "decoder layers that get adapters, e.g. 0-15,30 (default: all)")
    use_dora: bool = opt(False, "weight-decomposed LoRA (DoRA): slower steps, often better quality")
    use_rslora: bool = opt(False, "rank-stabilised scaling alpha/sqrt(r), for high ranks")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = self.target_modules.replace(",", " ").split()
        if self.lora_r < 1:
            raise ConfigError("lora_r", f"must be a positive integer, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError("lora_alpha", f"must be > 0 (the update is scaled by alpha/r), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ConfigError("target_modules", "is empty; use a preset such as all or attention, or module names")


@dataclass
class DataArgs:
    dataset_path: Optional[str] = opt(None, "training data: a JSONL, JSON, CSV or Parquet file, a datasets "
                                            "save_to_disk directory or a Hub dataset id, with prompt/response, "
                                            "prompt/completion, alpaca, messages or text records")
    dataset_split: str = opt("train", "split to read when --dataset_path is a dataset with several splits")
    columns: Optional[str] = opt(None, "field=column mapping for data with other names, e.g. "
                                       "prompt=question,response=answer or messages=conversations (ShareGPT)")
    val_path: Optional[str] = opt(None, "validation data, any --dataset_path source (default: --val_split of the "
                                        "training data)")
    val_dataset_split: str = opt("validation", "split to read when --val_path is a dataset with several splits")
    val_split: float = opt(0.1, "fraction of the training data held out for validation; 0 turns validation off")
    max_length: int = opt(1024, "longest example in tokens; longer ones follow --long_examples")
    long_examples: str = opt("truncate", "truncate: cut the answer's end (no EOS is trained on a cut answer); "
                                         "drop: skip the example. Both are counted", choices=("truncate", "drop"))
    train_on_prompt: bool = opt(False, "also train on prompt tokens (default: loss on the answer only)")
    template: str = opt("auto", "auto | chat | phi2: chat uses the tokenizer's chat template, phi2 the "
                                "'Instruct: ...\\nOutput: ...' format; auto picks chat when the tokenizer has one",
                        choices=("auto", "chat", "phi2"))
    system_prompt: Optional[str] = opt(None, "system prompt put before every example (and used at chat time)")

    def __post_init__(self) -> None:
        if not 0 <= self.val_split < 1:
            raise ConfigError("val_split", f"must be in [0, 1), got {self.val_split}")
        if self.columns:
            from phitune.data.sources import parse_columns
            parse_columns(self.columns)  # a malformed mapping fails here, before any data is read
        if self.max_length < 8:
            raise ConfigError("max_length", f"must be at least 8 tokens, got {self.max_length}")


TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")


@dataclass
class TrainArgs:
    output_dir: Optional[str] = opt(None, "where checkpoints, metrics and final_adapter/ are written")
    batch_size: int = opt(4, "examples per micro-batch")
    epochs: float = opt(20, "passes over the training data")
    gradient_accumulation_steps: int = opt(16, "micro-batches per optimizer step (effective batch = "
                                               "batch_size x this x processes)")
    learning_rate: float = opt(2e-4, "peak learning rate (AdamW, cosine decay)")
    warmup_ratio: float = opt(0.05, "fraction of optimizer steps spent warming the learning rate up")
    weight_decay: float = opt(0.0, "AdamW weight decay on LoRA weights")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 turns clipping off")
    gradient_checkpointing: str = opt("auto", "recompute activations in backward (less memory, ~30% slower "
                                              "steps): auto turns it on only when the run would not fit in "
                                              "the device's memory without it; true | false force it",
                                      choices=("auto", "true", "false"), switch=True)
    torch_compile: bool = opt(False, "compile the model with torch.compile (pays off on long runs)")
    seed: int = opt(42, "seed for data order, validation split, LoRA init and dropout")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (overrides --epochs)")
    eval_steps: Optional[int] = opt(None, "also validate every N optimizer steps (always at each epoch end)")
    save_steps: Optional[int] = opt(None, "checkpoint every N optimizer steps (always at each epoch end)")
    save_total_limit: int = opt(2, "checkpoints kept on disk (oldest removed first)")
    early_stopping_patience: Optional[int] = opt(None, "stop after N validations without a better loss")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --output_dir")
    logging_steps: int = opt(1, "write metrics every N optimizer steps")
    num_processes: int = opt(1, "data-parallel processes on this machine (launches torch.distributed; same as "
                                "`accelerate launch --num_processes N -m phitune train ...`)")
    max_nonfinite_steps: int = opt(10, "stop after this many optimizer steps in a row with a NaN/inf loss or "
                                       "gradient (each one is skipped and counted)")
    report_to: list = opt([], "experiment trackers to log to: tensorboard, trackio, wandb, mlflow (several "
                              "allowed; offline where the tracker can be), or none (default: none)", nargs="+")
    run_name: Optional[str] = opt(None, "run name shown in the trackers (default: the --output_dir folder name)")
    method: str = opt("sft", "sft: supervised, on examples; dpo: direct preference optimisation and orpo: odds-ratio "
                             "preference optimisation, both on {prompt, chosen, rejected} pairs (--batch_size counts "
                             "pairs; each puts 2 rows in the batch). dpo's reference is the starting point (the base, "
                             "or --adapter_path); orpo needs none", choices=("sft", "dpo", "orpo"))
    beta: float = opt(0.1, "dpo: beta, how far the tuned policy may move from the reference (higher: stays closer); "
                           "orpo: lambda, the weight of the odds-ratio term beside the NLL of the chosen answers "
                           "(TRL's ORPOConfig calls it beta too); unused by sft")
    rpo_alpha: float = opt(0.0, "dpo: weight of the chosen answers' NLL (token mean) added to the DPO loss (RPO). "
                                "DPO alone can lower the chosen answers' likelihood along with the rejected ones', "
                                "most on near-miss pairs that share most tokens; 0.2-1 keeps them likely. TRL: "
                                "loss_type [sigmoid, sft], loss_weights [1, alpha]. Default 0: plain DPO")

    def __post_init__(self) -> None:
        at_least_one(self, "batch_size", "gradient_accumulation_steps", "save_total_limit", "logging_steps",
                     "max_nonfinite_steps", "num_processes")
        for name in ("max_steps", "eval_steps", "save_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1 when given, got {value}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError("learning_rate", f"must be a positive number, got {self.learning_rate}")
        if not self.epochs > 0:
            raise ConfigError("epochs", f"must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if isinstance(self.report_to, str):
            self.report_to = self.report_to.replace(",", " ").split()
        if any(name.lower() == "none" for name in self.report_to):  # Hugging Face's spelling of "no trackers"
            if len(self.report_to) > 1:
                raise ConfigError("report_to", f"none cannot be combined with a tracker, got "
                                               f"{' '.join(self.report_to)}")
            self.report_to = []
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ConfigError("report_to", f"unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
        if not (math.isfinite(self.beta) and self.beta >= 0) or (self.method == "dpo" and self.beta == 0):
            raise ConfigError("beta", f"must be a number > 0 (>= 0 for orpo), got {self.beta}")
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ConfigError("rpo_alpha", f"must be a number >= 0, got {self.rpo_alpha}")
        if self.rpo_alpha and self.method != "dpo":
            raise ConfigError("rpo_alpha", f"applies to --method dpo only (orpo has its own NLL term); drop it or "
                                           f"use --method dpo, got --method {self.method}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("max_grad_norm" if self.max_grad_norm < 0 else "weight_decay", "must be >= 0")


@dataclass
class RunConfig:
    model: ModelArgs
    lora: LoraArgs
    data: DataArgs
    train: TrainArgs

    def to_dict(self) -> dict[str, Any]:
        """Every field of every part in one flat dict (as saved with the adapter and sent to trackers)."""
        out = {}
        for part in (self.model, self.lora, self.data, self.train):
            out.update(dataclasses.asdict(part))
        return out


GROUPS = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "train": TrainArgs}


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def _help_text(f: dataclasses.Field, default: Any) -> str:
    """The field's help with its default appended, unless the help already says it or there is none to show."""
    text = f.metadata["help"]
    if isinstance(default, bool):
        default = "on" if default else "off"
    if "(default" not in text and default is not None and default != []:
        text += f" (default: {' '.join(default) if isinstance(default, list) else default})"
    return text.replace("%", "%%")  # argparse formats help with %


class _Toggle(argparse.Action):
    """--name turns a boolean on, --no_name turns it off (the first option string is the positive one)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string == self.option_strings[0])

    def format_usage(self) -> str:
        """Both spellings in the usage line, as argparse's BooleanOptionalAction shows them."""
        return " | ".join(self.option_strings)


def add_arguments(parser: argparse.ArgumentParser, groups: dict[str, type] = GROUPS) -> None:
    """Add one flag per dataclass field; defaults are SUPPRESSed so we can tell which flags were given.

    Spelling: --field_name VALUE; booleans are --name / --no_name. Earlier spellings (--no-name, and the
    fields' `aliases` such as --api-key) still parse but are left out of --help.
    """
    for title, cls in groups.items():
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _base_type(hints[f.name])
            name = f"--{f.name}"
            kw: dict[str, Any] = dict(default=argparse.SUPPRESS)
            hidden = []  # (spelling, keywords): accepted, not shown
            if kind is bool:
                negative = [] if f.name.startswith("no_") else [f"--no_{f.name}"]
                group.add_argument(name, *negative, action=_Toggle, help=_help_text(f, default_of(f)), **kw)
                hidden.append((f"--no-{f.name}", dict(action="store_false")))
            elif f.metadata.get("switch"):  # --name (= true), --no_name (= false) or --name VALUE
                group.add_argument(name, nargs="?", const="true", type=str.lower, choices=f.metadata["choices"],
                                   help=_help_text(f, default_of(f)), **kw)
                group.add_argument(f"--no_{f.name}", dest=f.name, action="store_const", const="false",
                                   help=f"same as {name} false", **kw)
                hidden.append((f"--no-{f.name}", dict(action="store_const", const="false")))
            else:
                if kind is list:
                    kw.update(dict(action="append") if f.metadata.get("repeat") else dict(nargs="+"))
                else:
                    kw.update(type=kind, choices=f.metadata.get("choices"))
                group.add_argument(name, help=_help_text(f, default_of(f)), **kw)
                hidden += [(alias, {k: v for k, v in kw.items() if k != "default"})
                           for alias in f.metadata.get("aliases", ())]
            for spelling, extra in hidden:
                group.add_argument(spelling, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **extra)
    parser.add_argument("--config", help="YAML file of the same fields; flags given on the command line win")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a --config YAML file; PhituneError when missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise PhituneError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PhituneError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PhituneError(f"{path}: expected a mapping of field: value at the top level")
    return data


def build_config(args: argparse.Namespace, groups: dict[str, type] = GROUPS, also_known: Iterable[str] = ()
                 ) -> dict[str, Any]:
    """Merge dataclass defaults, the --config YAML and explicit flags, then validate every field.

    A YAML value goes through the same checks as the flag would (type, choices, the dataclass's own);
    a YAML null on a field that can be unset means "not given". also_known: YAML keys accepted and
    ignored (another command's fields, so that one file can serve both).
    """
    known = {f.name: name for name, cls in groups.items() for f in dataclasses.fields(cls)}
    values, where = {}, {}
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        for key, value in data.items():
            if key in known:
                values[key], where[key] = value, f"{args.config}: {key}"
            elif key not in also_known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{args.config}: {key}", f"unknown key{hint}")
    flags = {k: v for k, v in vars(args).items() if k in known}
    values.update(flags)
    where.update({k: k for k in flags})
    parts = {}
    for name, cls in groups.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = values.get(f.name)
            if value is None and f.name in values and not _optional(hints[f.name]):
                raise ConfigError(where[f.name], f"has no value; give one ({_base_type(hints[f.name]).__name__}) or "
                                                 f"remove the line to keep the default")
            if value is not None:
                kwargs[f.name] = _coerce(where[f.name], value, _base_type(hints[f.name]), f)
            elif f.metadata.get("required"):
                raise PhituneError(f"--{f.name} is required (or {f.name}: in the --config file)")
        parts[name] = cls(**kwargs)
    return parts


def settings(args: argparse.Namespace, groups: dict[str, type], also_known: Iterable[str] = ()) -> Any:
    """A command's typed, validated settings as one namespace (field -> value), plus each part by group name."""
    import types
    parts = build_config(args, groups, also_known)
    flat = {k: v for part in parts.values() for k, v in dataclasses.asdict(part).items()}
    return types.SimpleNamespace(**flat, parts=parts, _argv=getattr(args, "_argv", None))


def _coerce(name: str, value: Any, kind: type, f: dataclasses.Field) -> Any:
    """value (from a flag or YAML) as the field's type, or ConfigError naming the field, as a bad flag would."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if f.metadata.get("switch") and isinstance(value, bool):  # YAML true/false
            value = "true" if value else "false"
        if kind is list:
            if isinstance(value, dict):
                raise ValueError
            return [str(v) for v in value] if isinstance(value, list) else str(value).replace(",", " ").split()
        if isinstance(value, (bool, list, dict)):  # YAML's yes/no, [..] and {..} are not numbers or text
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {kind.__name__}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value
