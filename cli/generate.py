"""`nextserve generate`: stream a completion from a checkpoint in-process, or from a running router."""
from __future__ import annotations

import argparse
import json
import sys

from nextserve.cli.process import CACHE_MEMORY_HELP, add_dtype_flag


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], per generated token seen")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], per occurrence")
    g.add_argument("--stop-token-ids", type=_int_list, default=[], help="comma-separated ids that end generation")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    g.add_argument("--seed", type=int, default=None, help="same seed and prompt give the same tokens")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a checkpoint (in-process) or a router",
        description="Generate a completion and stream it to stdout. Give a prompt as text or with "
                    "--prompt-ids. Either --checkpoint DIR runs the model in this process, or --router "
                    "HOST:PORT asks a running nextserve router (same flags, same output).",
        epilog='example: nextserve generate --checkpoint checkpoints/small --temperature 0 "Hello"')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="HF-layout checkpoint directory to run in-process")
    src.add_argument("--router", metavar="HOST:PORT", help="address of a running nextserve router")
    p.add_argument("prompt", nargs="?", help="prompt text")
    p.add_argument("--prompt-ids", type=_int_list, help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object: {"token_ids", "text", "finish_reason"}. With --prompt-ids and --json '
                        'no tokenizer is needed: a checkpoint without tokenizer.json (as transformers\' '
                        'save_pretrained writes) works, and "text" is left out')
    add_dtype_flag(p, "in-process model weight, activation and KV cache")
    p.add_argument("--device", default="cpu", help="torch device for the in-process model (default cpu)")
    p.add_argument("--kv-cache-memory", default="4GiB", metavar="SIZE", help="in-process: " + CACHE_MEMORY_HELP)
    p.add_argument("--speculative-tokens", type=int, default=0, choices=range(0, 5), metavar="K",
                   help="in-process: draft up to K (1-4) tokens per step with the MTP head and verify them in one "
                        "pass (0, default: off; a router takes its own --speculative-tokens)")
    session = p.add_argument_group("sessions (with --router)")
    session.add_argument("--session-id", metavar="ID",
                         help="a conversation the router keeps: it stores this turn's prompt and output")
    session.add_argument("--append-to-session", action="store_true",
                         help="the prompt is only the new turn; the router puts the session's stored history first")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if (args.prompt is None) == (args.prompt_ids is None):
        print("error: give either a prompt text or --prompt-ids", file=sys.stderr)
        return 2
    if (args.session_id or args.append_to_session) and not args.router:
        print("error: --session-id and --append-to-session need --router (a router keeps the sessions)", file=sys.stderr)
        return 2
    if args.router and args.speculative_tokens:
        print("error: --speculative-tokens runs the in-process model; start the router with it instead", file=sys.stderr)
        return 2
    if args.router:
        from nextserve.client.cli import generate_cli_remote
        return generate_cli_remote(args)
    return _run_local(args)


def sampling_params(args):
    from nextserve.model.sampling import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos, seed=args.seed)


def _run_local(args) -> int:
    from nextserve.cli.process import resolve_dtype
    from nextserve.model import Qwen3NextForCausalLM, generate_stream
    from nextserve.model.tokenizer import load_tokenizer_if_present
    from nextserve.router.runner import plan_cache

    try:
        params = sampling_params(args)
        tokenizer = load_tokenizer_if_present(args.checkpoint)
        if tokenizer is None and (args.prompt_ids is None or not args.json):
            raise ValueError(f"no tokenizer.json in {args.checkpoint}: without one, give the prompt as --prompt-ids "
                             "and read the answer as token ids with --json")
        model = Qwen3NextForCausalLM.from_pretrained(args.checkpoint, dtype=resolve_dtype(args.dtype, args.device),
                                                     device=args.device, with_mtp=args.speculative_tokens > 0)
        print(plan_cache(model, args.kv_cache_memory, 1).describe(), file=sys.stderr)
        eos = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
        prompt_ids = args.prompt_ids if args.prompt_ids is not None else tokenizer.encode(args.prompt)
        detok = tokenizer.incremental_detokenizer() if tokenizer is not None else None
        completion = None
        for _, _, completion in generate_stream(model, [prompt_ids], [params], eos,
                                                kv_cache_memory=args.kv_cache_memory,
                                                speculative_tokens=args.speculative_tokens):
            if not args.json:
                sys.stdout.write(detok.step(completion.output_ids))
                sys.stdout.flush()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        result = {"token_ids": completion.output_ids, "finish_reason": completion.finish_reason}
        if tokenizer is not None:  # without a tokenizer there is no text to give
            result["text"] = tokenizer.decode(completion.output_ids)
        print(json.dumps({k: result[k] for k in ("token_ids", "text", "finish_reason") if k in result}))
    else:
        print(detok.flush())
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
