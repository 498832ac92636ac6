"""A transformers causal LM (already merged) -> one GGUF file that llama.cpp runs, without llama.cpp itself.

Tensor names, metadata keys and the q/k row order follow llama.cpp's own loaders for three architectures:
  llama  Llama / SmolLM2 / Mistral: q_proj and k_proj rows are re-ordered (llama.cpp rotates interleaved
         pairs, transformers rotates the two halves of each head).
  phi2   Phi-2: LayerNorm with biases, partial rotary dimensions, parallel attention + MLP (fc1/fc2).
  phi3   Phi-3 / Phi-3.5-mini: fused qkv_proj and gate_up_proj, LongRoPE factors as two small tensors.
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from phitune.errors import PhituneError

if TYPE_CHECKING:
    import gguf
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from phitune.data.templates import Template

# transformers model_type -> llama.cpp architecture name
ARCHS = {"llama": "llama", "mistral": "llama", "phi": "phi2", "phi3": "phi3"}
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


# transformers module (inside model.layers.N) -> llama.cpp tensor (inside blk.N), per architecture
LAYER_NAMES = {
    "llama": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "phi2": {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up",
             "mlp.fc2": "ffn_down"},
    "phi3": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"},
}


def supported() -> str:
    """The model types GGUF export handles, with their llama.cpp architecture, as text for messages."""
    return ", ".join(f"{k} ({v})" for k, v in ARCHS.items())


def arch_for(config: PretrainedConfig) -> str:
    """The llama.cpp architecture name for config.model_type; PhituneError when export does not support it."""
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise PhituneError(f"export: GGUF export supports the model types {supported()}; this model is "
                           f"'{config.model_type}'. Use `phitune merge` for a transformers model instead")
    return arch


# ---------------------------------------------------------------- tensors

def permute_for_llamacpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k: per head, transformers' [first half | second half] -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: PretrainedConfig) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or {})


def _check_rope(config: PretrainedConfig, allowed: tuple[str, ...]) -> str:
    kind = _rope(config).get("rope_type", "default")
    if kind not in allowed:
        raise PhituneError(f"export: rope_type '{kind}' is not supported for {config.model_type} GGUF export "
                           f"(supported: {', '.join(allowed)})")
    return kind


def tensors(model: PreTrainedModel, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (gguf name, float32 numpy array) for every weight llama.cpp reads, one tensor at a time
    (a 4B model is not copied whole). Refuses, before yielding anything, a model with weights the layout
    has no place for."""
    cfg = model.config
    sd = model.state_dict()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    plan = [("token_embd.weight", "model.embed_tokens.weight")]  # (gguf name, transformers key or array)
    if arch in ("llama", "phi3"):
        plan.append(("output_norm.weight", "model.norm.weight"))
    else:
        plan += [("output_norm.weight", "model.final_layernorm.weight"),
                 ("output_norm.bias", "model.final_layernorm.bias")]
    if not tied:
        plan.append(("output.weight", "lm_head.weight"))
    elif arch != "llama":  # llama.cpp's llama loader falls back to token_embd; phi2/phi3 want the matrix
        plan.append(("output.weight", "model.embed_tokens.weight"))
    if "lm_head.bias" in sd:
        plan.append(("output.bias", "lm_head.bias"))
    rope = _rope(cfg)
    if arch == "phi3" and rope.get("long_factor"):
        plan += [("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)),
                 ("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_NAMES[arch].items():
            for kind in ("weight", "bias"):
                if f"model.layers.{i}.{hf}.{kind}" in sd:
                    plan.append((f"blk.{i}.{gg}.{kind}", f"model.layers.{i}.{hf}.{kind}"))
    used = {src for _, src in plan if isinstance(src, str)} | {"lm_head.weight"}
    left = sorted(k for k in sd if k not in used and "rotary_emb" not in k)
    if left:
        raise PhituneError(f"export: this {cfg.model_type} model has weights the {arch} GGUF layout has no place "
                           f"for ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}); it cannot be exported")
    heads = {"attn_q": cfg.num_attention_heads,
             "attn_k": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    for name, src in plan:
        w = src if not isinstance(src, str) else sd[src].detach().to(torch.float32).cpu().numpy()
        gg = name.split(".")[-2]
        if arch == "llama" and gg in heads:
            w = permute_for_llamacpp(w, heads[gg])
        yield name, w


def encode_tensor(name: str, data: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array, raw ggml type or None) for one tensor in the chosen out type.

    1-D tensors (norms, biases, rope factors) stay float32, as llama.cpp's converter keeps them; a matrix
    whose rows do not fill whole 32-value quantization blocks falls back to f16.
    """
    import gguf
    if data.ndim == 1 or outtype == "f32":
        return data.astype(np.float32, copy=False), None
    if outtype == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}[outtype]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:
        return data.astype(np.float16), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


# ---------------------------------------------------------------- hyper-parameters

def add_hparams(w: gguf.GGUFWriter, cfg: PretrainedConfig, arch: str, outtype: str) -> None:
    """Model hyper-parameters (sizes, heads, rope, norms) and the file type, as llama.cpp reads them for arch."""
    import gguf
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = _rope(cfg)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if arch == "llama":
        _check_rope(cfg, ("default",))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        if head_dim * cfg.num_attention_heads != cfg.hidden_size:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(cfg.vocab_size)
    elif arch == "phi2":
        _check_rope(cfg, ("default",))
        if getattr(cfg, "qk_layernorm", False):
            raise PhituneError("export: Phi models with qk_layernorm have no llama.cpp phi2 equivalent")
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    else:  # phi3
        kind = _check_rope(cfg, ("default", "longrope", "su"))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rot = int(rope.get("partial_rotary_factor", 1.0) * head_dim)
        w.add_rope_dimension_count(rot)
        orig = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings",
                                                                         None) or cfg.max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(getattr(cfg, "sliding_window", None) or 0)
        if kind != "default" and rope.get("long_factor"):
            if len(rope["long_factor"]) != rot // 2 or len(rope.get("short_factor") or []) != rot // 2:
                raise PhituneError(f"export: LongRoPE factors must have {rot // 2} entries each")
            scale = cfg.max_position_embeddings / orig
            attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig))
                                                    if scale > 1.0 else 1.0)
            w.add_rope_scaling_attn_factors(float(attn))
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    if outtype in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------- tokenizer

def _pre_tokenizer_name(tj: dict[str, Any]) -> str:
    """llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json, read from its structure.

    llama.cpp identifies pre-tokenizers by name, each name standing for a fixed set of split regexes.
    The names below are the ones whose regexes equal these transformers pre-tokenizer layouts; anything
    else is refused rather than tokenised differently without notice.
    """
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex: Phi-2, the tokenizers library's default byte-level BPE, SmolLM2 as here
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    if (types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in json.dumps(steps[0].get("pattern", {}))):
        return "llama-bpe"  # Llama 3's regex
    raise PhituneError(f"export: this tokenizer's pre-tokenizer ({' + '.join(map(str, types))}) has no known "
                       f"llama.cpp equivalent; supported: GPT-2 byte-level, SmolLM digits + byte-level, Llama 3")


def add_tokenizer(w: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, cfg: PretrainedConfig, template: Template
                  ) -> None:
    """Vocabulary, merges, token types, pre-tokenizer, special ids and the chat template."""
    import gguf
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj["model"]
    if model.get("type") != "BPE":
        raise PhituneError(f"export: only BPE tokenizers are supported (this one is {model.get('type')})")
    vocab = tokenizer.get_vocab()
    n_vocab = cfg.vocab_size
    if len(vocab) > n_vocab:
        raise PhituneError(f"export: the tokenizer has {len(vocab)} tokens but the model only {n_vocab} rows")
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    byte_fallback = bool(model.get("byte_fallback"))
    if byte_fallback:
        # SentencePiece-style BPE (Phi-3's tokenizer as tokenizer.json): llama.cpp's "llama" tokenizer merges
        # the adjacent pair whose joined token scores highest, transformers the pair that comes first in the
        # merges list. A token's score is therefore minus the rank of its first merge. (Not minus the id: Phi-3
        # lists the whitespace runs "▁▁", "▁▁▁▁" ... last among the merges although their ids are small.)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        for i, text in enumerate(tokens):
            if types[i] == gguf.TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[i] = gguf.TokenType.BYTE
        merges = model.get("merges") or []
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            rank.setdefault(left + right, r)
        unmerged = len(merges)  # single characters and unreachable pieces: below every merge
        w.add_token_list(tokens)
        w.add_token_scores([-float(rank.get(text, unmerged + i)) if types[i] == gguf.TokenType.NORMAL else -1000.0
                            for i, text in enumerate(tokens)])
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer_name(tj))
        w.add_token_list(tokens)
        merges = model.get("merges") or []
        w.add_token_merges([m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
                            for m in merges])
    w.add_token_types(types)
    # BOS/EOS are added by llama.cpp exactly when the transformers tokenizer adds them.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    w.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
                             and plain[:1] != probe[:1]))
    w.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
                             and plain[-1:] != probe[-1:]))
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    eot = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    if eot is not None and eot != tokenizer.eos_token_id:
        w.add_eot_token_id(eot)
    if tokenizer.unk_token_id is not None:
        w.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(chat_template(template))


_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


def file_name(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """general.name for a GGUF of a model with `tokenizer`: `name`, adjusted so that llama.cpp's whitespace
    rule for special tokens is the tokenizer's.

    A GGUF has no per-token strip flags. llama.cpp makes every special token except <unk>, <s> and
    <|endoftext|> (and makes "</s>") swallow the whitespace after it when, and only when, general.name
    contains "phi3" or "phi-3": Phi-3's tokenizer does exactly that (its "<|user|>\n" is one token). So the
    name carries that marker exactly when the tokenizer strips that way, whatever the run is called.
    """
    added = list(tokenizer.added_tokens_decoder.values())
    rstrip = {t.content for t in added if t.rstrip}
    vocab = tokenizer.get_vocab()
    fixed = ("<unk>", "<s>", "<|endoftext|>")
    phi3_rule = ({t.content for t in added} | {"</s>"}) - set(fixed)
    phi3_like = bool(rstrip) and rstrip == phi3_rule and all(t in vocab for t in ("</s>", *fixed))
    if (rstrip and not phi3_like) or any(t.lstrip for t in added):
        print(f"export: note: some special tokens of this tokenizer strip the whitespace around them "
              f"({', '.join(sorted(t.content for t in added if t.rstrip or t.lstrip)[:4])}); a GGUF cannot record "
              f"that, so llama.cpp may split text next to them differently", file=sys.stderr)
    if phi3_like and not _PHI3_NAME.search(name):
        return f"{name} (Phi-3)"
    if not phi3_like:
        return _PHI3_NAME.sub(lambda m: m.group(0)[:3] + " 3", name)
    return name


PHI2_TEMPLATE = (
    "{%- set ns = namespace(answered=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] | trim }}{{ '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{% if ns.answered %}{{ '\\n' }}{% endif %}"
    "{{ 'Instruct: ' + m['content'] + '\\nOutput:' }}"
    "{%- else -%}{{ ' ' + (m['content'] | trim) + eos_token }}{% set ns.answered = true %}"
    "{%- endif -%}{%- endfor -%}")


def chat_template(template: Template) -> str:
    """The Jinja chat template the file carries: the one phitune trained with (Phi-2: Instruct/Output),
    with the adapter's recorded system prompt used when a conversation brings none."""
    body = template.to_meta()["chat_template"] if template.kind == "chat" else PHI2_TEMPLATE
    if not template.system_prompt:
        return body
    system = json.dumps(template.system_prompt, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set messages = [{'role': 'system', 'content': " + system + "}] + messages -%}"
            "{%- endif -%}" + body)
