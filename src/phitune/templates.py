"""One template object renders training examples and chat prompts, so both see the same text.

Kinds:
  chat  the tokenizer's own chat template (Phi-3.5, SmolLM2, Llama 3, ...); each answer ends with the
        template's end-of-turn token (<|end|>, <|im_end|>, <|eot_id|>), which is trained on.
  phi2  Phi-2's documented format: "Instruct: <prompt>\nOutput: <answer><EOS>".
The choice, the end-of-turn token and the stop tokens are recorded in the adapter directory.
"""
from phitune.data import IGNORE
from phitune.errors import PhituneError

_SENTINEL = "\u2063PHITUNE_ANSWER\u2063"


class Template:
    def __init__(self, tokenizer, kind="auto", system_prompt=None, chat_template=None):
        self.tok = tokenizer
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if kind == "auto":
            kind = "chat" if has_chat else "phi2"
        if kind == "chat" and not has_chat:
            raise PhituneError("template: this tokenizer has no chat template; use --template phi2")
        self.kind = kind
        self.system_prompt = system_prompt or None
        self.eos_token = tokenizer.eos_token
        self.end_of_turn = self._find_end_of_turn() if kind == "chat" else tokenizer.eos_token
        self.stop_tokens = list(dict.fromkeys([self.end_of_turn, self.eos_token]))

    # -------------------------------------------------------------- facts recorded with the adapter
    def to_meta(self):
        return {"kind": self.kind, "system_prompt": self.system_prompt, "end_of_turn": self.end_of_turn,
                "eos_token": self.eos_token, "stop_tokens": self.stop_tokens,
                "chat_template": self.tok.chat_template if self.kind == "chat" else None}

    @classmethod
    def from_meta(cls, tokenizer, meta, system_prompt=None):
        return cls(tokenizer, meta.get("kind", "auto"), system_prompt or meta.get("system_prompt"),
                   chat_template=meta.get("chat_template"))

    def stop_token_ids(self):
        ids = [self.tok.convert_tokens_to_ids(t) for t in self.stop_tokens]
        return [i for i in dict.fromkeys(ids) if i is not None and i != self.tok.unk_token_id]

    # -------------------------------------------------------------- rendering
    def _with_system(self, messages):
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def _render_chat(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _find_end_of_turn(self):
        """The special token the chat template puts right after an assistant answer."""
        text = self._render_chat([{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": _SENTINEL}], False)
        tail = text.split(_SENTINEL, 1)[-1].lstrip()
        for token in sorted(self.tok.all_special_tokens + list(self.tok.get_added_vocab()), key=len, reverse=True):
            if token and tail.startswith(token):
                return token
        return self.tok.eos_token

    def render_prompt(self, messages):
        """Text that asks the model for the next assistant turn (history ends with a user turn)."""
        messages = self._with_system(messages)
        if self.kind == "chat":
            return self._render_chat(messages, True)
        return "".join(t + (self.eos_token if eos else "") for t, _, eos in self._phi2_pieces(messages))

    def encode_prompt(self, messages):
        """Token ids of render_prompt(messages), tokenised exactly as in training."""
        return self._tokenize(self.render_prompt(messages), first=True)

    # -------------------------------------------------------------- tokenising
    def encode(self, record):
        """(input_ids, labels) for one record; labels are IGNORE on prompt tokens, answer tokens
        (including the end-of-turn/EOS token) keep their ids."""
        tok = self.tok
        if "text" in record:
            ids = tok(record["text"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
            return ids, list(ids)
        messages = self._with_system(record["messages"])
        segments = self._chat_segments(messages) if self.kind == "chat" else self._phi2_pieces(messages)
        ids, labels = [], []
        for text, trained, append_eos in segments:
            piece = self._tokenize(text, first=not ids and not trained)
            if append_eos:
                piece = piece + [tok.eos_token_id]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels

    def _tokenize(self, text, first):
        """BOS is added once, at the very start, unless the template already wrote it."""
        bos = self.tok.bos_token
        add = first and not (bos and text.startswith(bos))
        return self.tok(text, add_special_tokens=add)["input_ids"] if text else []

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
                raise PhituneError("the tokenizer's chat template does not render a conversation as a prefix of "
                                   "its continuation, so answers cannot be masked; use --template phi2 or "
                                   "--train_on_prompt")
            answer = full[len(prompt):]
            cut = answer.find(self.end_of_turn)
            append_eos = cut < 0
            answer = answer if append_eos else answer[:cut + len(self.end_of_turn)]
            out += [(prompt[len(consumed):], False, False), (answer, True, append_eos)]
            consumed = prompt + answer
        return out
