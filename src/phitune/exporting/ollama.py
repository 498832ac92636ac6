"""The Ollama Modelfile for an exported GGUF: the prompt template phitune trained with, in Go template
syntax, the system prompt and the stop tokens."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from phitune.errors import PhituneError

if TYPE_CHECKING:
    from phitune.data.templates import Template

# Markers that no real text contains: rendered through the template, then split on.
_S, _U, _A, _U2 = "\u2063SYS\u2063", "\u2063USER\u2063", "\u2063ANSWER\u2063", "\u2063NEXT\u2063"

def _split(text: str, *marks: str) -> list[str]:
    out = []
    for m in marks:
        head, sep, text = text.partition(m)
        if not sep:
            raise PhituneError("export: cannot derive an Ollama template from this chat template")
        out.append(head)
    return out + [text]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def ollama_template(template: Template) -> str:
    """A Go template for Ollama that renders a conversation, turn by turn, exactly as phitune's template does.

    It uses .System/.Prompt/.Response only, so Ollama executes it once per past (prompt, answer) pair and once
    for the last prompt, cut after {{ .Response }}. Each execution must therefore render one turn as it reads
    inside a longer conversation: the text after a past answer is what separates it from the next turn
    (Phi-3's "<|end|>\n" without the template's closing <|endoftext|>; Phi-2's EOS and the newline before
    the next "Instruct:"), and {{ if .Response }} tells a past turn from the one being asked.
    """
    plain = copy.copy(template)
    plain.system_prompt = None
    user = [{"role": "user", "content": _U}]
    pre_user, post_user = _split(plain.render_prompt(user), _U)
    pre_sys, sys_to_user, post_user_sys = _split(plain.render_prompt([{"role": "system", "content": _S}, *user]),
                                                 _S, _U)
    if post_user_sys != post_user:
        raise PhituneError("export: the chat template ends a user turn differently with and without a system "
                           "prompt; an Ollama template cannot express that")
    two = [*user, {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}]
    head, between, after_answer, tail = _split(plain.render_prompt(two), _U, _A, _U2)
    # Ollama repeats the template per turn: the second turn must open as a first one does.
    if head != pre_user or tail != post_user or not after_answer.endswith(pre_user):
        raise PhituneError("export: the chat template renders a later turn differently from the first one; an "
                           "Ollama template cannot express that")
    answer_post = after_answer[:len(after_answer) - len(pre_user)]
    with_sys = _split(plain.render_prompt([{"role": "system", "content": _S}, *two]), _S, _U, _A, _U2)
    if with_sys != [pre_sys, sys_to_user, between, after_answer, tail]:
        raise PhituneError("export: the chat template renders a conversation with a system prompt differently "
                           "after its first turn; an Ollama template cannot express that")
    # Text between the prompt and a past answer (Phi-2's space) belongs to the answer's tokens in training, so
    # it is written for past answers only: the model generates it itself. Text that ends only the last prompt
    # (an answer prefix such as an empty reasoning block) is written for the last turn only.
    shared = _common_prefix(between, post_user)
    answer_pre, prompt_end = between[len(shared):], post_user[len(shared):]
    for piece in (pre_sys, sys_to_user, pre_user, post_user, between, answer_post):
        if "{{" in piece or '"""' in piece:
            raise PhituneError("export: the chat template's text contains '{{' or '\"\"\"', which a Modelfile "
                               "cannot carry")
    turn_end = ("{{ if .Response }}" + answer_pre + ("{{ else }}" + prompt_end if prompt_end else "") + "{{ end }}"
                if answer_pre or prompt_end else "")
    return ("{{ if .System }}" + pre_sys + "{{ .System }}" + sys_to_user + "{{ else }}" + pre_user + "{{ end }}"
            "{{ .Prompt }}" + shared + turn_end + "{{ .Response }}" + answer_post)


def modelfile(gguf_name: str, template: Template, source: str | Path) -> str:
    """An Ollama Modelfile for gguf_name: FROM, the prompt TEMPLATE, SYSTEM and stop PARAMETERs; source: the adapter."""
    lines = [f"# Written by phitune export from {source}.",
             "# Create the model with: ollama create NAME -f Modelfile   (run it: ollama run NAME)",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{ollama_template(template)}"""']
    if template.system_prompt:
        if '"""' in template.system_prompt:
            raise PhituneError('export: the system prompt contains \'"""\', which a Modelfile cannot carry')
        lines.append(f'SYSTEM """{template.system_prompt}"""')
    lines += [f'PARAMETER stop "{t}"' for t in template.stop_tokens if t]
    return "\n".join(lines) + "\n"
