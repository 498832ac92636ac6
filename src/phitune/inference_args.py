"""Flags shared by the commands that generate (chat, compare, eval, serve)."""
from phitune.generate import Sampling


def add_model_args(parser, multiple_adapters=False):
    if multiple_adapters:
        parser.add_argument("--adapter_path", action="append", default=[],
                            help="adapter directory (final_adapter/ of a run); repeat to compare several")
    else:
        parser.add_argument("--adapter_path", help="adapter directory (final_adapter/ of a run); omit for the base")
    parser.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--system_prompt", help="system prompt (default: the one recorded with the adapter)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own Python code")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32", "fp16"))


def add_sampling_args(parser, max_new_tokens=256):
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), reproducible")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="longest answer in tokens")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help=">1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (recorded when sampling)")


def sampling_from(args):
    from phitune.errors import PhituneError
    if args.temperature < 0:
        raise PhituneError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise PhituneError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        raise PhituneError(f"--top_p must be in (0, 1], got {args.top_p}")
    seed = args.seed
    if args.temperature > 0 and seed is None:
        import random
        seed = random.randrange(2**31)
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty, seed)
