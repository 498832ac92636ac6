"""Typed configuration of the commands that use a trained adapter: chat, compare, eval, serve, merge, export.

Same rules as training's config.py: each field is a flag and a `--config` YAML key, documented once,
validated in __post_init__ with a message that names the field; flags given on the command line win.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

from phitune.config import DataArgs, ModelArgs, at_least_one, opt, same_as
from phitune.errors import ConfigError
from phitune.exporting.gguf_writer import OUTTYPES
from phitune.generation.engine import Sampling

PRECISIONS = ("auto", "bf16", "fp32", "fp16", "int8")


@dataclass
class Models:
    """The base model and the adapters to load (compare, eval, serve)."""
    adapter_path: list = opt([], "adapter directory (a run's final_adapter/), or NAME=DIR; repeat for several",
                             repeat=True)
    model: Optional[str] = opt(None, "base model (default: the one the adapter was trained on)")
    system_prompt: Optional[str] = opt(None, "system prompt for every model (default: the one each adapter "
                                             "recorded; none for the base)")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own Python code")
    precision: str = opt("auto", "auto | bf16 | fp32 | fp16 | int8: weights for generation. auto: bf16 on GPUs and "
                                 "on CPUs with native bf16, fp32 elsewhere. int8: every linear weight int8 with one "
                                 "scale per row (fastest on a CPU; answers close to, not equal to, full precision)",
                         choices=PRECISIONS)


@dataclass
class OneModel(Models):
    """One adapter, or the base alone (chat)."""
    adapter_path: Optional[str] = opt(None, "adapter directory (a run's final_adapter/); omit for the base")

    @property
    def adapters(self) -> list[str]:
        """The adapter directory as a list: empty for the base model."""
        return [self.adapter_path] if self.adapter_path else []


@dataclass
class SamplingArgs:
    temperature: float = opt(0.0, "0 = greedy (reproducible)")
    top_p: float = opt(1.0, "nucleus sampling threshold, in (0, 1]")
    top_k: int = opt(0, "sample from the k most likely tokens (0 = off)")
    max_new_tokens: int = opt(256, "longest answer in tokens")
    repetition_penalty: float = opt(1.0, "> 1 discourages repeats")
    seed: Optional[int] = opt(None, "seed for sampling (a random one is drawn and recorded when sampling)")

    def __post_init__(self) -> None:
        at_least_one(self, "max_new_tokens")
        problem = Sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                           self.repetition_penalty).problem()  # the engine's own rules (nan, inf, ranges)
        if problem:
            raise ConfigError(*problem)

    def sampling(self) -> Sampling:
        """These settings as an engine Sampling, with a random seed drawn (and kept) when sampling unseeded."""
        seed = self.seed
        if self.temperature > 0 and seed is None:
            seed = random.randrange(2**31)
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty, seed)


@dataclass
class ChatSampling(SamplingArgs):
    temperature: float = opt(0.7, "0 = greedy (reproducible)")
    top_p: float = opt(0.9, "nucleus sampling threshold, in (0, 1]")
    max_new_tokens: int = opt(512, "longest answer in tokens")


@dataclass
class ChatArgs:
    prompt: Optional[str] = opt(None, "answer this one prompt and exit")


@dataclass
class CompareArgs:
    questions: Optional[str] = opt(None, "YAML file: questions: [text, or {prompt, expected, sampling...}]")
    report: Optional[str] = opt(None, "write the comparison to .md, .html or .jsonl")
    batch_size: int = opt(16, "answers generated together (all models share the batches)")
    no_color: bool = opt(False, "plain text output")
    web: bool = opt(False, "compare in the browser instead: serve the page of `phitune serve` on 127.0.0.1 "
                           "and print its address")
    port: int = opt(8000, "port of the page with --web")
    allowed_hosts: list = opt([], "with --web: another host name the page may be reached by (the server answers "
                                  "only requests for 127.0.0.1, localhost and IP addresses: DNS rebinding); "
                                  "repeat for several", repeat=True)

    def __post_init__(self) -> None:
        at_least_one(self, "batch_size")


@dataclass
class EvalArgs:
    data: Optional[str] = opt(None, "test data: any training source (JSONL, JSON, CSV, Parquet, datasets "
                                    "directory)", required=True)
    output: Optional[str] = opt(None, "write all scores to this JSON file")
    max_length: int = opt(1024, "longest example scored, in tokens")
    batch_size: int = opt(16, "examples per forward / generation batch")
    max_new_tokens: int = opt(128, "longest generated answer")
    no_generate: bool = opt(False, "loss and perplexity only (fast)")
    limit: Optional[int] = opt(None, "score only the first N questions")

    def __post_init__(self) -> None:
        at_least_one(self, "max_length", "batch_size", "max_new_tokens")


@dataclass
class ServeArgs:
    host: str = opt("127.0.0.1", "interface to bind (default: localhost only)")
    port: int = opt(8000, "TCP port")
    api_key: Optional[str] = opt(None, "require 'Authorization: Bearer KEY' on every route but /health",
                                 aliases=("--api-key",))
    max_tokens_limit: int = opt(1024, "largest max_tokens a request may ask for")
    max_prompt_tokens: Optional[int] = opt(None, "longest prompt (never more than context - max_tokens)")
    max_body_bytes: int = opt(1_000_000, "largest request body")
    max_queue: int = opt(64, "requests waiting at once; more get 429")
    max_batch: int = opt(16, "requests generated together in one batch")
    run_dir: list = opt([], "a training run whose curves the page at / shows (repeat for several; each "
                            "adapter's own run is shown without it)", repeat=True)
    allowed_hosts: list = opt([], "another host name clients reach this server by (a DNS name, or * for any); "
                                  "requests for names other than localhost, IP addresses and --host are refused "
                                  "(DNS rebinding); repeat for several", repeat=True)

    def __post_init__(self) -> None:
        at_least_one(self, "max_tokens_limit", "max_body_bytes", "max_batch", "max_queue")


@dataclass
class MergeArgs:
    adapter_path: Optional[str] = opt(None, "adapter directory to merge", required=True)
    output_dir: Optional[str] = opt(None, "where the merged model is written", required=True)
    model: Optional[str] = opt(None, "base model (default: the one the adapter was trained on)")
    dtype: str = opt("float32", "dtype of the saved weights (the check runs in float32 first)",
                     choices=("float32", "bfloat16", "float16"))
    tolerance: float = opt(1e-3, "largest allowed logit difference")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own Python code")


@dataclass
class ExportArgs:
    adapter_path: Optional[str] = opt(None, "adapter directory to merge and export", required=True)
    output: Optional[str] = opt(None, "GGUF file to write, e.g. model.gguf", required=True)
    format: str = opt("gguf", "gguf: the merged model as one GGUF file; ollama: that file and an Ollama Modelfile "
                              "beside it; lora: the adapter alone as a GGUF LoRA for llama.cpp's --lora",
                      choices=("gguf", "ollama", "lora"))
    outtype: str = opt("f16", "weight type: f32 and f16 keep the merged model's answers; bf16, q8_0 and q4_0 are "
                              "smaller and approximate (1-D tensors stay f32; --format lora is always f32)",
                       choices=OUTTYPES)
    model: Optional[str] = opt(None, "base model (default: the one the adapter was trained on)")
    tolerance: float = opt(1e-3, "largest allowed merge logit difference")
    trust_remote_code: bool = opt(False, "allow the model repository to run its own Python code")
    force: bool = opt(False, "with --format ollama: replace a Modelfile that already exists beside the output")


@dataclass
class PlanArgs:
    """`phitune plan`'s own options (the run itself is described by the training options)."""
    measure: bool = opt(False, "also run two real training steps of the longest batch and print the measured peak "
                               "memory and step time (needs --dataset_path)")
    memory_gib: Optional[float] = opt(None, "plan for a device with this much memory, in GiB (default: this one's)")
    table: Optional[str] = opt(None, "write the Phi-2 / Phi-3.5-mini table for common devices to this file")

    def __post_init__(self) -> None:
        if self.memory_gib is not None and not (self.memory_gib > 0 and math.isfinite(self.memory_gib)):
            raise ConfigError("memory_gib", f"must be a positive number of GiB, got {self.memory_gib}")


@dataclass
class InspectArgs:
    """`phitune data inspect`: the data options of `phitune train`, read the way training reads them."""
    dataset_path: Optional[str] = opt(None, "the data, when FILE is not given (e.g. from a training --config)")
    model: Optional[str] = opt(None, "model whose tokenizer and template count the tokens (default: none; "
                                     "characters are counted)")
    trust_remote_code: bool = same_as(ModelArgs, "trust_remote_code")
    dataset_split: str = same_as(DataArgs, "dataset_split")
    columns: Optional[str] = same_as(DataArgs, "columns")
    max_length: int = same_as(DataArgs, "max_length")
    long_examples: str = same_as(DataArgs, "long_examples")
    train_on_prompt: bool = same_as(DataArgs, "train_on_prompt")
    template: str = same_as(DataArgs, "template")
    system_prompt: Optional[str] = same_as(DataArgs, "system_prompt")
    examples: int = opt(3, "rendered examples to show (first, median length, longest)")

    def __post_init__(self) -> None:
        DataArgs(dataset_split=self.dataset_split, columns=self.columns, max_length=self.max_length,
                 long_examples=self.long_examples, train_on_prompt=self.train_on_prompt, template=self.template,
                 system_prompt=self.system_prompt)  # train's own checks, so both commands refuse the same values
        if self.examples < 0:
            raise ConfigError("examples", f"must be >= 0, got {self.examples}")
