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
_S, _U, _A = "\u2063SYS\u2063", "\u2063USER\u2063", "\u2063ANSWER\u2063"

def _split(text: str, *marks: str) -> list[str]:
    out = []
    for m in marks:
        head, sep, text = text.partition(m)
        if not sep:
            raise PhituneError("export: cannot derive an Ollama template from this chat template")
        out.append(head)
    return out + [text]


def ollama_template(template: Template) -> str:
    """A Go template for Ollama that renders one turn exactly as phitune's template does."""
    plain = copy.copy(template)
    plain.system_prompt = None
    pre_sys, sys_to_user, post_user = _split(plain.render_prompt([{"role": "system", "content": _S},
                                                                  {"role": "user", "content": _U}]), _S, _U)
    pre_user, post_user_nosys = _split(plain.render_prompt([{"role": "user", "content": _U}]), _U)
    if post_user_nosys != post_user:
        raise PhituneError("export: the chat template ends a user turn differently with and without a system "
                           "prompt; an Ollama template cannot express that")
    if template.kind == "chat":
        turn = [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}]
        full = plain._render_chat(turn, False)
        answer_pre, answer_post = _split(full[len(plain.render_prompt(turn[:1])):], _A)
    else:
        answer_pre, answer_post = " ", template.eos_token
    for piece in (pre_sys, sys_to_user, pre_user, post_user, answer_pre, answer_post):
        if "{{" in piece or '"""' in piece:
            raise PhituneError("export: the chat template's text contains '{{' or '\"\"\"', which a Modelfile "
                               "cannot carry")
    # Text between the prompt and the answer (Phi-2's space) belongs to the answer's tokens in training, so it
    # is written only for past answers: the model generates it itself, as it learned to.
    answer_pre = "{{ if .Response }}" + answer_pre + "{{ end }}" if answer_pre else ""
    return ("{{ if .System }}" + pre_sys + "{{ .System }}" + sys_to_user + "{{ else }}" + pre_user + "{{ end }}"
            "{{ .Prompt }}" + post_user + answer_pre + "{{ .Response }}" + answer_post)


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
