"""`phitune serve`: the base model and its adapters behind the OpenAI HTTP API.

POST /v1/chat/completions and /v1/completions (streaming over server-sent events or not), GET /v1/models.
One base model in memory; each adapter is its own model name. Requests are batched together on one
generation thread (generation/scheduler.py), base and adapter rows in the same batch; a client that disconnects
frees its row within one step. Every route but /health and the page (/, /static; webui/) needs the key
when --api_key is set.
"""
import argparse
import sys

from phitune.config import add_arguments, settings
from phitune.config_commands import Models, ServeArgs
from phitune.generation import load as gen
from phitune.serving.routes import build_app, server

GROUPS = {"model": Models, "serve": ServeArgs}


def add_parser(p: argparse.ArgumentParser) -> None:
    add_arguments(p, GROUPS)


def main(args: argparse.Namespace) -> int:
    args = settings(args, GROUPS)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"phitune serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    loaded = gen.load(args.adapter_path, args.model, args.system_prompt, args.trust_remote_code, args.precision)
    app = build_app(loaded, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
                    max_queue=args.max_queue, max_batch=args.max_batch, run_dirs=args.run_dir, host=args.host,
                    allowed_hosts=args.allowed_hosts)
    names = ", ".join(["base", *loaded.adapters])
    print(f"phitune serve: models {names} on http://{args.host}:{args.port}/v1; page: http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    server(app, args.host, args.port).run()
    return 0
