"""Render an Ollama Modelfile's prompt as Ollama does, without Ollama: a small Go-template interpreter for the
subset phitune writes, and Ollama's own way of turning a chat into one prompt.

Followed from ollama/ollama (server/routes.go and template/template.go):
  - the Modelfile's SYSTEM becomes a leading system message when the request starts with none;
  - consecutive messages of one role are joined with a blank line (collate);
  - a TEMPLATE that names .System/.Prompt/.Response but not .Messages is the "legacy" form: it is executed
    once per finished (prompt, answer) pair, with .System set only for the turn that follows a system
    message, and once more for the last user turn with every node after the first `{{ .Response }}`
    action deleted (an `if` whose test reads .Response is not a cut point: Ollama does not walk pipes of
    `if` nodes).
Anything outside that subset (range, pipes, functions, trim markers) raises, so a template phitune starts
writing differently fails the tests instead of being rendered wrongly.
"""
import re

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_FIELD = re.compile(r"\s*\.(System|Prompt|Response)\s*")


def parse(text):
    """Go template text -> nodes: ("text", s), ("field", name), ("if", name, then_nodes, else_nodes)."""
    pos, root, stack = 0, [], []
    current = root
    for m in _ACTION.finditer(text):
        if m.start() > pos:
            current.append(("text", text[pos:m.start()]))
        pos = m.end()
        body = m.group(1)
        if body.startswith("-") or body.endswith("-"):
            raise ValueError(f"unsupported trim marker in {m.group(0)!r}")
        words = body.split()
        if len(words) == 2 and words[0] == "if" and _FIELD.fullmatch(" " + words[1]):
            node = ("if", words[1][1:], [], [])
            current.append(node)
            stack.append((node, current))
            current = node[2]
        elif words == ["else"]:
            if not stack or current is not stack[-1][0][2]:
                raise ValueError("{{ else }} outside an if")
            current = stack[-1][0][3]
        elif words == ["end"]:
            if not stack:
                raise ValueError("{{ end }} without an if")
            current = stack.pop()[1]
        elif _FIELD.fullmatch(body):
            current.append(("field", _FIELD.fullmatch(body).group(1)))
        else:
            raise ValueError(f"unsupported action {m.group(0)!r}")
    if stack:
        raise ValueError("unclosed {{ if }}")
    if pos < len(text):
        current.append(("text", text[pos:]))
    return root


def _cut_after_response(nodes, state):
    """Ollama's deleteNode: keep everything up to and including the first `{{ .Response }}` action."""
    out = []
    for node in nodes:
        if state["cut"]:
            continue
        if node[0] == "field" and node[1] == "Response":
            state["cut"] = True
        if node[0] == "if":
            node = ("if", node[1], _cut_after_response(node[2], state), _cut_after_response(node[3], state))
        out.append(node)
    return out


def _execute(nodes, values):
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(values.get(node[1], ""))
        else:
            out.append(_execute(node[2] if values.get(node[1]) else node[3], values))
    return "".join(out)


def _collate(messages):
    out = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def render_chat(template, messages, system=None):
    """The prompt Ollama's /api/chat builds from `messages` with this TEMPLATE and the Modelfile's SYSTEM."""
    if "Messages" in template:
        raise ValueError("the .Messages form is not modelled here")
    tree = parse(template)
    if not re.search(r"\.Response\b", template):  # Ollama's Parse appends {{ .Response }} then
        tree.append(("field", "Response"))
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    out, sys_, prompt, response = [], "", "", ""
    for m in _collate(messages):
        if m["role"] == "system":
            if prompt or response:
                out.append(_execute(tree, {"System": sys_, "Prompt": prompt, "Response": response}))
                sys_, prompt, response = "", "", ""
            sys_ = m["content"]
        elif m["role"] == "user":
            if response:
                out.append(_execute(tree, {"System": sys_, "Prompt": prompt, "Response": response}))
                sys_, prompt, response = "", "", ""
            prompt = m["content"]
        elif m["role"] == "assistant":
            response = m["content"]
    last = _cut_after_response(tree, {"cut": False})
    out.append(_execute(last, {"System": sys_, "Prompt": prompt, "Response": response}))
    return "".join(out)


def modelfile_parts(text):
    """(TEMPLATE, SYSTEM or None, [stop strings]) read from a Modelfile's text."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return template, system and system.group(1), re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
