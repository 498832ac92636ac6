"""`phitune <command>`: one entry point; each command is a module with add_parser() and main()."""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import warnings
from typing import NoReturn

from phitune import __version__
from phitune.errors import PhituneError

# command -> (module, one-line help). Modules are imported only when their command runs,
# so `phitune --help` stays fast.
COMMANDS = {
    "train": ("phitune.train", "fine-tune a model with LoRA on a dataset (JSONL, JSON, CSV, Parquet, datasets)"),
    "chat": ("phitune.chat", "talk to a base model or a fine-tuned adapter (streaming)"),
    "compare": ("phitune.compare", "answer the same questions with the base model and adapters, side by side"),
    "eval": ("phitune.evaluate", "score base and adapters on held-out data: loss, perplexity, BLEU, chrF, ROUGE-L"),
    "merge": ("phitune.merge", "merge an adapter into its base model and save it for plain transformers"),
    "export": ("phitune.export", "merge an adapter and write one GGUF file for llama.cpp / Ollama"),
    "serve": ("phitune.serve", "serve base and adapters over the OpenAI HTTP API"),
    "plan": ("phitune.plan", "estimate memory and time of a training run before starting it (--measure: check it)"),
    "data": ("phitune.data_cli", "inspect a dataset: format, records, token lengths, truncation, rendered examples"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The phitune parser; only the subcommand named in argv is imported and gets its options."""
    parser = argparse.ArgumentParser(prog="phitune", description="Fine-tune small language models with LoRA.")
    parser.add_argument("--version", action="version", version=f"phitune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if wanted in COMMANDS and name != wanted:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module) if name == wanted else None
        p = sub.add_parser(name, help=help_text, description=help_text)
        if mod is not None:
            p.set_defaults(_parser=p)  # a nested action's parser (data inspect) replaces it
            mod.add_parser(p)
            p.set_defaults(_main=mod.main)
    return parser


def unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> NoReturn:
    """Refuse arguments `parser` (a subcommand's) does not take, with its usage and the closest flag it has."""
    shown = {s.lstrip("-"): s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    hints = []
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), shown, n=1)
            hints += [f"did you mean {shown[close[0]]}?"] if close else []
    parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; {' '.join(hints)}" if hints else ""))


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run one subcommand (argv defaults to sys.argv[1:]) and exit with its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library deprecation notices are for phitune's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        unknown_flags(getattr(args, "_parser", parser), extra)
    args._argv = argv  # the command line as given, for commands that relaunch themselves
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2 if args.command is None else 0
    try:
        code = args._main(args)
    except PhituneError as e:
        print(f"phitune {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nphitune {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
