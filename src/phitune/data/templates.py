"""One template object renders training examples and chat prompts, so both see the same text and ids.

Kinds:
  chat  the tokenizer's own chat template (Phi-3.5, SmolLM2, Llama 3, ...); each answer ends with the
        template's end-of-turn token (<|end|>, <|im_end|>, <|eot_id|>), which is trained on.
  phi2  Phi-2's documented format: "Instruct: <prompt>\nOutput: <answer><EOS>".
The choice, the chat template text, the end-of-turn token and the stop tokens are recorded in the adapter
directory.

Tokenising: a training example is tokenised as one growing text, prefix by prefix, never piece by piece.
SentencePiece-style tokenizers (Phi-3.5's Metaspace `▁`, special tokens that swallow the newline after
them) give different ids for a piece alone than for the same piece inside the conversation, so the ids of
the prompt before answer k are exactly encode_prompt(history up to k), and the answer ids are the ones
the whole rendered conversation tokenises to.

Special-token text inside system and user content ("<|im_end|>\n<|im_start|>system ...") is text, never
the tokens themselves: otherwise whoever writes a message could open turns of other roles. Such content is
marked before rendering and the marks become the plain-text ids of that text, the same way for training
examples and for every prompt, so both still agree.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100  # label id that the loss skips

_SENTINEL = "\u2063PHITUNE_ANSWER\u2063"
# Stands for the special-token text number N inside content while a conversation is rendered and tokenised.
_MARK = "\u2063PHITUNE_TEXT{}\u2063"
_MARKED = re.compile("\u2063PHITUNE_TEXT(\\d+)\u2063")


def _own_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str | None:
    """The chat template text this Template uses; the tokenizer object is never modified, so one tokenizer
    can serve several adapters, each with its own template."""
    if chat_template is not None:
        return chat_template
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template()  # resolves a dict of named templates to its "default"
    except ValueError:
        return None


class Template:
    """How a conversation becomes tokens and labels for one tokenizer: a chat template or Phi-2's format."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kind: str = "auto", system_prompt: str | None = None,
                 chat_template: str | None = None) -> None:
        """kind: auto (chat when the tokenizer has a chat template, else phi2), chat or phi2;
        chat_template: a template text to use instead of the tokenizer's own."""
        self.tok = tokenizer
        self.chat_template = _own_chat_template(tokenizer, chat_template)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = {*tokenizer.all_special_tokens, *(t.content for t in added.values() if t.special)}
        self._specials = sorted((t for t in specials if t), key=len, reverse=True)  # longest first
        self._special_text = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._boundary_ids = {*tokenizer.all_special_ids, *added}  # where the tokenizer splits its input
        has_chat = bool(self.chat_template)
        if kind == "auto":
            kind = "chat" if has_chat else "phi2"
        if kind == "chat" and not has_chat:
            raise PhituneError("template: this tokenizer has no chat template; use --template phi2")
        self.kind = kind
        self.system_prompt = system_prompt or None
        self.eos_token = tokenizer.eos_token
        self.notes: list[str] = []  # facts about the template worth printing once when training starts (take_notes)
        self.answer_prefix = ""
        self.end_of_turn = tokenizer.eos_token
        if kind == "chat":
            self.answer_prefix, self.end_of_turn = self._inspect_chat_template()
        self.stop_tokens = list(dict.fromkeys([self.end_of_turn, self.eos_token]))

    # -------------------------------------------------------------- facts recorded with the adapter
    def to_meta(self) -> dict[str, Any]:
        """What an adapter's phitune.json records, so that from_meta rebuilds the same template."""
        return {"kind": self.kind, "system_prompt": self.system_prompt, "end_of_turn": self.end_of_turn,
                "eos_token": self.eos_token, "stop_tokens": self.stop_tokens,
                "chat_template": self.chat_template if self.kind == "chat" else None}

    @classmethod
    def from_meta(cls, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any], system_prompt: str | None = None
                  ) -> Template:
        """The template recorded in `meta` (to_meta's dict); system_prompt, when given, replaces the recorded one."""
        return cls(tokenizer, meta.get("kind", "auto"), system_prompt or meta.get("system_prompt"),
                   chat_template=meta.get("chat_template"))

    def take_notes(self) -> list[str]:
        """Notes not handed out yet, so that a run prints each once (train and validation share a template)."""
        notes, self.notes = self.notes, []
        return notes

    def stop_token_ids(self) -> list[int]:
        """Token ids of the stop tokens (end of turn, EOS) that the tokenizer knows, without repeats."""
        # An unknown token converts to the unknown id, which is dropped; a token that *is* the unknown token
        # is kept (Phi-2's <|endoftext|> is its EOS and its unknown token alike).
        ids = [self.tok.convert_tokens_to_ids(t) for t in self.stop_tokens
               if t == self.tok.unk_token or self.tok.convert_tokens_to_ids(t) != self.tok.unk_token_id]
        return [i for i in dict.fromkeys(ids) if i is not None]

    # -------------------------------------------------------------- rendering
    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def _render_chat(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            chat_template=self.chat_template)

    def _inspect_chat_template(self):
        """(answer_prefix, end_of_turn), read off a conversation whose answer is a sentinel.

        answer_prefix: text the template writes into every assistant turn before the answer itself (Qwen3's
        empty reasoning block "<think>\\n\\n</think>\\n\\n"). Trained as part of the answer, every example
        would teach the model to produce it; instead it belongs to the prompt: not trained, and chat/serve
        put it at the end of the prompt too, so the model sees the same text in both.
        end_of_turn: the special token the template puts right after an answer.
        """
        convo = [{"role": "user", "content": "hi"}]
        prompt = self._render_chat(convo, True)
        text = self._render_chat(convo + [{"role": "assistant", "content": _SENTINEL}], False)
        if _SENTINEL not in text:
            raise PhituneError("template: the chat template does not write the assistant's answer into the "
                               "conversation, so there is nothing to train on; use --template phi2")
        before, tail = text.split(_SENTINEL, 1)
        prefix = before[len(prompt):] if before.startswith(prompt) else ""
        if prefix:
            self.notes.append(f"template: the chat template writes {prefix!r} before every answer; it is part of "
                              f"the prompt (not trained), and chat/serve add it to their prompts too")
        tail = tail.lstrip()
        for token in sorted(self.tok.all_special_tokens + list(self.tok.get_added_vocab()), key=len, reverse=True):
            if token and tail.startswith(token):
                return prefix, token
        return prefix, self.tok.eos_token

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        """Text that asks the model for the next assistant turn (history ends with a user turn)."""
        return self._render_prompt(self._with_system(messages))

    def _render_prompt(self, messages):
        if self.kind == "chat":
            return self._render_chat(messages, True) + self.answer_prefix
        return "".join(t + (self.eos_token if eos else "") for t, _, eos in self._phi2_pieces(messages))

    def encode_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of render_prompt(messages), tokenised exactly as in training (special-token text in system
        and user content as plain text)."""
        return self._tokenize(self._render_prompt(self._as_text(self._with_system(messages))))

    # -------------------------------------------------------------- special-token text in content
    def _as_text(self, messages):
        """Messages whose system and user content has each special-token text replaced by its mark."""
        if self._special_text is None:
            return messages
        index = {t: i for i, t in enumerate(self._specials)}
        out = []
        for m in messages:
            if m["role"] in ("system", "user") and self._special_text.search(m["content"]):
                m = {**m, "content": self._special_text.sub(lambda hit: _MARK.format(index[hit.group()]), m["content"])}
            out.append(m)
        return out

    def _unmark(self, text):
        return _MARKED.sub(lambda hit: self._specials[int(hit.group(1))], text)

    def _encode(self, text, add_special_tokens, offsets=False):
        """The tokenizer's encoding of `text` ({"input_ids"[, "offset_mapping"]}), with each mark in it encoded as
        the plain text it stands for.

        The tokenizer cuts its input at added tokens and encodes each stretch between them on its own. A stretch
        that holds a mark is encoded again with the marks' text in place and special tokens read as text; every
        other id is the tokenizer's own, so content without special-token text costs one tokenizer call."""
        marked = _MARKED.search(text) is not None
        kw = {"return_offsets_mapping": True} if offsets or marked else {}
        enc = self.tok(text, add_special_tokens=add_special_tokens, **kw)
        if not marked:
            return enc
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        out_ids, out_spans, i = [], [], 0
        start = 0  # where the current stretch begins in `text`
        while i < len(ids):
            if ids[i] in self._boundary_ids:
                out_ids.append(ids[i])
                out_spans.append(spans[i])
                start = max(start, spans[i][1])
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] not in self._boundary_ids:
                j += 1
            # a token the post-processor added (EOS: span (0, 0)) is no cut in the text
            end = spans[j][0] if j < len(ids) and spans[j][1] > 0 else len(text)
            if _MARKED.search(text, start, end):
                piece_ids, piece_spans = self._plain_text(text, start, end)
                out_ids += piece_ids
                out_spans += piece_spans
            else:
                out_ids += ids[i:j]
                out_spans += spans[i:j]
            i = j
        return {"input_ids": out_ids, "offset_mapping": out_spans}

    def _plain_text(self, text, start, end):
        """(ids, spans in `text`) of text[start:end] with its marks replaced by their text, read as plain text."""
        plain, starts, ends, at = "", [], [], start
        for hit in _MARKED.finditer(text, start, end):
            literal = text[at:hit.start()]
            plain += literal
            starts += range(at, hit.start())
            ends += range(at + 1, hit.start() + 1)
            special = self._specials[int(hit.group(1))]
            plain += special
            starts += [hit.start()] * len(special)
            ends += [hit.end()] * len(special)
            at = hit.end()
        plain += text[at:end]
        starts += range(at, end)
        ends += range(at + 1, end + 1)
        enc = self.tok(plain, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        spans = [(starts[a] if a < len(starts) else end, ends[b - 1] if b > 0 else start)
                 for a, b in enc["offset_mapping"]]
        return enc["input_ids"], spans

    # -------------------------------------------------------------- tokenising
    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for one record; labels are IGNORE on prompt tokens, answer tokens
        (including the end-of-turn/EOS token) keep their ids."""
        tok = self.tok
        if "text" in record:
            ids = tok(record["text"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
            return ids, list(ids)
        messages = self._with_system(record["messages"])
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                # read_jsonl names the file and line; this catches records built in code. (Chat history
                # may hold an empty answer: render_prompt accepts it.)
                raise PhituneError(f"conversation {self._opening(messages)}: messages[{i}] is an empty assistant "
                                   f"turn: it would train the model to end its turn without answering; write "
                                   f"the answer or remove the turn")
        messages = self._as_text(messages)
        segments = self._chat_segments(messages) if self.kind == "chat" else self._phi2_pieces(messages)
        return self._encode_segments(segments)

    def _tokenize(self, text):
        """BOS is added once, at the very start, unless the template already wrote it."""
        bos = self.tok.bos_token
        add = not (bos and text.startswith(bos))
        return self._encode(text, add)["input_ids"] if text else []

    def _encode_segments(self, segments):
        """Tokenise [(text, trained, append_eos)] as one text that grows segment by segment.

        Each step tokenises the whole text so far; its ids extend the ids so far whenever the tokenizer
        is stable at the boundary, which is always so at the special tokens that end and open chat turns.
        Then the prompt before each answer is token for token what encode_prompt gives for that history,
        and the answer ids are the ones of the full conversation. Where a merge crosses the boundary (a
        byte-level answer that starts with the newline the template ends with), the new segment's ids are
        its in-context ids with the part the merge took tokenised alone: the prompt stays exact.
        """
        whole = self._encode_whole(segments)
        if whole is not None:
            return whole
        ids, labels, text = [], [], ""
        eos_id = self.tok.eos_token_id
        for piece, trained, append_eos in segments:
            start = len(text)
            text += piece
            whole = self._tokenize(text)
            new = whole[len(ids):] if whole[:len(ids)] == ids else self._continuation(text, start)
            if append_eos:
                new = new + [eos_id]
                text += self.eos_token or ""  # later prefixes are tokenised with the EOS written out
            ids += new
            labels += new if trained else [IGNORE] * len(new)
        return ids, labels

    def _encode_whole(self, segments):
        """The same ids with one tokenisation of the whole conversation and one per prompt, instead of
        two per turn (long multi-turn data tokenises ~2x faster); None where that shortcut does not hold."""
        eot_id = self.tok.convert_tokens_to_ids(self.end_of_turn)
        if eot_id is None or any(append_eos for _, _, append_eos in segments):
            return None
        ids, text, spans = self._tokenize("".join(piece for piece, _, _ in segments)), "", []
        for piece, trained, _ in segments:
            if trained:
                prompt = self._tokenize(text)
                done = spans[-1][1] if spans else 0
                if len(prompt) < done or ids[:len(prompt)] != prompt or eot_id not in ids[len(prompt):]:
                    return None
                spans.append((len(prompt), ids.index(eot_id, len(prompt)) + 1))
            text += piece
        if not spans or spans[-1][1] != len(ids):
            return None
        labels = [IGNORE] * len(ids)
        for a, b in spans:
            labels[a:b] = ids[a:b]
        return ids, labels

    def _continuation(self, text, start):
        """Ids for text[start:] as it tokenises after text[:start], for a boundary the tokenizer merges across."""
        tok = self.tok
        try:
            enc = self._encode(text, False, offsets=True)
        except (NotImplementedError, ValueError):  # slow tokenizers have no offsets
            return tok(self._unmark(text[start:]), add_special_tokens=False)["input_ids"]
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        first = next((i for i, (a, _) in enumerate(offsets) if a >= start), len(ids))
        gap_from = start
        added = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
        if first and offsets[first - 1][1] > start and ids[first - 1] in added:
            gap_from = offsets[first - 1][1]  # whitespace an added token swallowed (rstrip) stays swallowed
        gap_to = offsets[first][0] if first < len(ids) else len(text)
        gap = text[gap_from:gap_to]
        return (self._encode(gap, False)["input_ids"] if gap else []) + ids[first:]

    def _phi2_pieces(self, messages):
        """[(text, trained, append_eos)]: prompts end with 'Output:', answers are ' <answer>' + EOS."""
        out, context = [], ""
        for m in messages:
            if m["role"] == "system":
                context += m["content"].strip() + "\n"
            elif m["role"] == "user":
                context += ("\n" if out else "") + f"Instruct: {m['content']}\nOutput:"
            else:
                out += [(context, False, False), (" " + m["content"].strip(), True, True)]
                context = ""
        if context:
            out.append((context, False, False))
        return out

    def _opening(self, messages):
        """Where a conversation is in the data: the start of its first user message."""
        first = self._unmark(next((m["content"] for m in messages if m["role"] == "user"), ""))
        return repr(first[:40] + ("..." if len(first) > 40 else ""))

    def _chat_segments(self, messages):
        """Split the rendered conversation into masked context and trained answers, answer by answer.

        Relies on the template rendering a conversation as a prefix of its continuation, which holds
        for ChatML, Phi-3 and Llama-3 style templates; anything else is reported.
        """
        out, consumed = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render_chat(messages[:i], True)
            full = self._render_chat(messages[:i + 1], False)
            if not prompt.startswith(consumed) or not full.startswith(prompt):
                if self.answer_prefix and consumed:
                    raise PhituneError(
                        f"conversation {self._opening(messages)}: the chat template writes {self.answer_prefix!r} only "
                        f"into the last answer of a conversation, so an earlier answer reads differently once a "
                        f"later turn follows and a multi-turn conversation cannot be trained so that it matches "
                        f"chat; use conversations with one assistant turn, or a chat template that renders every "
                        f"answer the same way")
                raise PhituneError(f"conversation {self._opening(messages)}: the tokenizer's chat template does not "
                                   f"render a conversation as a prefix of its continuation, so answers cannot be "
                                   f"masked; use --template phi2 or --train_on_prompt")
            answer = full[len(prompt):]
            if self.answer_prefix:
                if not answer.startswith(self.answer_prefix):
                    raise PhituneError(
                        f"conversation {self._opening(messages)}, messages[{i}]: the chat template rewrote this answer "
                        f"(it starts {answer[:60]!r} instead of the {self.answer_prefix!r} it writes before every "
                        f"answer, e.g. from a <think> block in the data); remove that from the answer so training "
                        f"matches the prompt chat uses")
                prompt, answer = prompt + self.answer_prefix, answer[len(self.answer_prefix):]
            cut = answer.find(self.end_of_turn)
            append_eos = cut < 0
            answer = answer if append_eos else answer[:cut + len(self.end_of_turn)]
            out += [(prompt[len(consumed):], False, False), (answer, True, append_eos)]
            consumed = prompt + answer
        return out
