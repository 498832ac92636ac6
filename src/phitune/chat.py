"""`phitune chat`: talk to a base model or a fine-tuned adapter, with streaming output.

Interactive in a terminal (line editing and history through readline); with --prompt or piped stdin it
answers and exits, printing only answers on stdout so it can be scripted.
"""
from __future__ import annotations

import json
import sys
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from phitune.config import add_arguments, settings
from phitune.config_commands import ChatArgs, ChatSampling, OneModel
from phitune.errors import PhituneError
from phitune.generation import load as gen

if TYPE_CHECKING:
    import argparse

    from phitune.generation.engine import Sampling

HELP = """commands:
  /help            this list
  /reset           forget the conversation so far
  /system TEXT     set the system prompt (and reset); /system alone clears it
  /temp X          sampling temperature (0 = greedy)
  /max_tokens N    longest answer in tokens
  /save FILE       write the conversation to FILE (JSON)
  /quit            leave (Ctrl-D works too); Ctrl-C stops an answer, not the session"""


GROUPS = {"model": OneModel, "chat": ChatArgs, "sampling": ChatSampling}


def add_parser(p: argparse.ArgumentParser) -> None:
    """Add the chat options (model, chat and sampling groups) to the subcommand parser p."""
    add_arguments(p, GROUPS)


def main(args: argparse.Namespace) -> int:
    """Run `phitune chat` with parsed args: one answer (--prompt), one per stdin line, or a session."""
    args = settings(args, GROUPS)
    sampling = args.parts["sampling"].sampling()
    paths = args.parts["model"].adapters
    # One adapter for the whole session: folded into the weights once, so a token costs what the base costs.
    loaded = gen.load(paths, args.model, args.system_prompt, args.trust_remote_code, args.precision, merge=True)
    adapter = loaded.first_adapter
    if args.prompt is not None:
        print(answer(loaded, [{"role": "user", "content": args.prompt}], sampling, adapter, echo=False))
        return 0
    if not sys.stdin.isatty():
        for line in sys.stdin:  # scripted use: each line is its own single-turn prompt
            if line.strip():
                print(answer(loaded, [{"role": "user", "content": line.rstrip("\n")}], sampling, adapter, echo=False))
                sys.stdout.flush()
        return 0
    Session(loaded, sampling, adapter).run()
    return 0


def answer(loaded: gen.Loaded, conversation: list[dict[str, str]], sampling: Sampling, adapter: str | None,
           echo: bool = True) -> str:
    """Stream one answer; returns its text. Ctrl-C ends the answer early and keeps what was said. Raises
    gen.ContextOverflow, before anything is generated, when the conversation and its answer would pass the
    model's context."""
    ids = loaded.template_for(adapter).encode_prompt(conversation)
    if loaded.room(len(ids), sampling.max_new_tokens) < sampling.max_new_tokens:
        raise gen.ContextOverflow(0, len(ids), sampling.max_new_tokens, loaded.context)
    cancel = threading.Event()
    text = ""
    pieces = gen.stream_ids(loaded, ids, sampling, adapter=adapter, cancel=cancel)
    try:
        for piece in pieces:
            text += piece
            if echo:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        cancel.set()
        pieces.close()
        if echo:
            sys.stdout.write(" [stopped]")
    if echo:
        sys.stdout.write("\n")
    return text.strip()


class Session:
    """An interactive conversation in the terminal, with /commands."""

    def __init__(self, loaded: gen.Loaded, sampling: Sampling, adapter: str | None) -> None:
        self.loaded, self.sampling, self.adapter = loaded, sampling, adapter
        self.history: list[dict[str, Any]] = []

    def run(self) -> None:
        """Read prompts until /quit or Ctrl-D, answering each with the conversation so far."""
        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass
        name = next(iter(self.loaded.metas), None)
        who = f"{name} on {self.loaded.base_name}" if name else self.loaded.base_name
        print(f"phitune chat: {who}. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if self.command(line.strip()) == "quit":
                    return
                continue
            self.history.append({"role": "user", "content": line})
            try:
                self._check_room()
            except gen.ContextOverflow as e:
                self.history.pop()
                print(f"(too long for the model: {e}. /reset starts a new conversation (/save FILE first keeps "
                      f"this one); /max_tokens N asks for a shorter answer)")
                continue
            sys.stdout.write("model> ")
            sys.stdout.flush()
            reply = answer(self.loaded, self.history, self.sampling, self.adapter)
            self.history.append({"role": "assistant", "content": reply})

    def _check_room(self) -> None:
        ids = self.loaded.template_for(self.adapter).encode_prompt(self.history)
        if self.loaded.room(len(ids), self.sampling.max_new_tokens) < self.sampling.max_new_tokens:
            raise gen.ContextOverflow(0, len(ids), self.sampling.max_new_tokens, self.loaded.context)

    def command(self, line: str) -> str | None:
        """Carry out one /command line; returns "quit" to end the session, else None."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return "quit"
            if name == "/help":
                print(HELP)
            elif name == "/reset":
                self.history = []
                print("(conversation cleared)")
            elif name == "/system":
                self.loaded.template.system_prompt = arg or None
                self.history = []
                print(f"(system prompt {'set' if arg else 'cleared'}; conversation cleared)")
            elif name == "/temp":
                temperature = _number(arg, float, "/temp X", low=0)
                problem = replace(self.sampling, temperature=temperature).problem()
                if problem:
                    raise PhituneError(f"usage: /temp X ({problem[1]})")
                self.sampling.temperature = temperature
                greedy = " (greedy)" if self.sampling.greedy and temperature else ""
                print(f"(temperature {temperature}{greedy})")
            elif name == "/max_tokens":
                self.sampling.max_new_tokens = _number(arg, int, "/max_tokens N", low=1)
                print(f"(max tokens {self.sampling.max_new_tokens})")
            elif name == "/save":
                if not arg:
                    raise PhituneError("usage: /save FILE")
                with open(arg, "w", encoding="utf-8") as fh:
                    json.dump({"system_prompt": self.loaded.template.system_prompt, "messages": self.history}, fh,
                              indent=2)
                print(f"(saved {len(self.history)} messages to {arg})")
            else:
                print(f"unknown command {name}; /help lists them")
        except (PhituneError, OSError) as e:
            print(f"error: {e}")
        return None


def _number(text: str, kind: type, usage: str, low: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise PhituneError(f"usage: {usage}") from None
    if value < low:
        raise PhituneError(f"usage: {usage} (at least {low})")
    return value
