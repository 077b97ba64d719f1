"""`nextserve generate --router HOST:PORT`: the remote form of `nextserve generate`, same output."""
from __future__ import annotations

import json
import sys

from .messages import ServingError
from .sync import Client


def generate_cli_remote(args) -> int:
    """Stream text to stdout, or with --json print {"token_ids", "text", "finish_reason"}. Returns the exit code."""
    prompt = args.prompt_ids if args.prompt_ids is not None else args.prompt
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty, seed=args.seed, stop_token_ids=list(args.stop_token_ids),
                    ignore_eos=args.ignore_eos, session_id=args.session_id or "",
                    append_to_session=args.append_to_session)
    with Client(args.router, timeout=3600.0) as client:
        try:
            if args.json:
                c = client.generate(prompt, **sampling)
                print(json.dumps({"token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}))
                return 0
            for chunk in client.generate_stream(prompt, **sampling):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            print()
            return 0
        except ServingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2 if e.code.name == "INVALID_ARGUMENT" else 1
