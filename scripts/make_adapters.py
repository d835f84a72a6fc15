#!/usr/bin/env python3
"""Make deterministic random PEFT LoRA demo adapters for a base model.

Writes OUT/demo-r{rank}-{i}/ (adapter_config.json + adapter_model.safetensors, made with PEFT)
for i = 0..COUNT-1, ranks assigned round-robin from --ranks, and OUT/manifest.json (name, rank,
lora_alpha, scaling, targets, seed, path relative to OUT). A and B are seeded random matrices
scaled so that ||scaling * B @ A|| = STRENGTH * ||W|| for every adapted weight W: the adapters
visibly change greedy outputs while the text stays readable. Adapters that already exist with
the same settings are skipped. Progress goes to stderr; the last line of stdout is OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from caraserve_router.assets import demo_adapters, model_prep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1] + "\nDetails: docs/MODELS.md",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="base model (HF llama directory); default: the prepared default model "
                        "SmolLM2-135M-Instruct (prepared first if needed)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the adapters and manifest.json (default: <repo>/.cache/adapters)")
    p.add_argument("--ranks", default="8,16,32,64",
                   help="comma list of LoRA ranks, assigned round-robin by adapter index (default: %(default)s)")
    p.add_argument("--count", type=int, default=4, help="number of adapters (default: %(default)s)")
    p.add_argument("--targets", default="all",
                   help="projections to adapt: all, attn (q,k,v,o), qkv, mlp (gate,up,down) or a comma list "
                        "of q,k,v,o,gate,up,down (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; adapter i is seeded by (seed, its name) (default: %(default)s)")
    p.add_argument("--alpha-mode", choices=demo_adapters.ALPHA_MODES, default="double",
                   help="lora_alpha per rank r: double = 2r (scaling 2), rank = r (scaling 1), const = --alpha "
                        "(scaling alpha/r), rslora = --alpha with use_rslora (scaling alpha/sqrt(r)); the "
                        "weights are normalised, so this only changes how the delta is split between weights "
                        "and scaling (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0,
                   help="lora_alpha for --alpha-mode const / rslora (default: %(default)s)")
    p.add_argument("--strength", type=float, default=demo_adapters.DEFAULT_STRENGTH,
                   help="||delta W|| / ||W|| (Frobenius) of every adapted weight (default: %(default)s; "
                        "0.25 already gives gibberish on SmolLM2-135M)")
    p.add_argument("--force", action="store_true", help="remake adapters that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        ranks = demo_adapters.parse_ranks(args.ranks)
        demo_adapters.parse_targets(args.targets)
        demo_adapters.alpha_for(ranks[0], args.alpha_mode, args.alpha)
    except ValueError as exc:
        parser.error(str(exc))
    if args.count <= 0:
        parser.error(f"--count must be positive, got {args.count}")
    if not (args.strength >= 0):
        parser.error(f"--strength must be >= 0, got {args.strength}")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    # Keep stderr to our progress lines: no per-file progress bars from transformers, no
    # deprecation warnings that PEFT triggers inside transformers.
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    out = args.out if args.out is not None else demo_adapters.default_adapters_dir()
    try:
        demo_adapters.make_demo_adapters(
            args.model_dir, out, ranks, args.count, args.targets, args.seed,
            alpha_mode=args.alpha_mode, alpha=args.alpha, strength=args.strength, force=args.force, log=log,
        )
    except (model_prep.ModelPrepError, model_prep.ModelDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(out).absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
