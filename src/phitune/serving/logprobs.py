"""Log-probabilities of generated tokens in OpenAI's two shapes: chat's `logprobs.content` entries and the
legacy completions' parallel lists.

The engine records, per token, the model's log-probability of it and of the best alternatives (before
temperature and penalties). Here each token becomes text: a token's text is what it adds to the text of the
tokens just before it, so the tokens of an answer join up to the answer (SentencePiece's leading space
included), and a token that holds only part of a character gets its bytes from the vocabulary.
"""
from __future__ import annotations

import copy
import re
from functools import lru_cache
from typing import Optional

FLOOR = -9999.0  # OpenAI's stand-in for an impossible token (JSON has no -inf)
CONTEXT = 4  # tokens before each one that are decoded with it


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict:
    """GPT-2's byte-level alphabet: the printable character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenTexts:
    """Turns the engine's (logprob, alternatives) records into entries (text, logprob, bytes, alternatives).

    Keeps its own copy of the tokenizer: the server's is busy encoding prompts on another thread."""

    def __init__(self, tokenizer):
        self.tok = copy.deepcopy(tokenizer)
        self.specials = set(self.tok.all_special_ids)

    def entries(self, tokens: list, records: list, start: int, end: int, stop_ids=()) -> list:
        """Entries of tokens[start:end]; a stop token (the end of the turn, not part of the text) has none."""
        out = []
        for i in range(start, min(end, len(tokens), len(records))):
            if tokens[i] in stop_ids:
                continue
            before = tokens[max(0, i - CONTEXT):i]
            prefix = self._decode(before) if before else ""
            logprob, best = records[i]
            out.append((*self._text(before, prefix, tokens[i]), _finite(logprob),
                        [(*self._text(before, prefix, t), _finite(lp)) for t, lp in best]))
        return out

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def _text(self, before, prefix, token):
        if token in self.specials:  # an alternative such as the end of the turn: shown by its name
            text = self.tok.convert_ids_to_tokens(token)
            return text, text.encode("utf-8")
        text = self._decode([*before, token])
        text = text[len(prefix):] if text.startswith(prefix) else self._decode([token])
        if "\ufffd" in text:  # part of a multi-byte character
            raw = self._raw_bytes(token)
            if raw is not None:
                return text, raw
        return text, text.encode("utf-8")

    def _raw_bytes(self, token) -> Optional[bytes]:
        piece = self.tok.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            return None
        hit = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if hit:
            return bytes([int(hit.group(1), 16)])
        chars = _byte_level_chars()
        if piece and all(c in chars for c in piece):
            return bytes(chars[c] for c in piece)
        return None


def _finite(x: float) -> float:
    return max(float(x), FLOOR)


def chat_content(entries: list) -> list:
    """Chat's logprobs.content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    return [{"token": text, "logprob": lp, "bytes": list(raw),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in best]}
            for text, raw, lp, best in entries]


def legacy(entries: list, offset: int) -> dict:
    """The completions shape: tokens, token_logprobs, top_logprobs ({text: logprob}, the chosen token included)
    and text_offset (from `offset`, characters into the answer)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, _, lp, best in entries:
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({**{t: v for t, _, v in best}, text: lp})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
