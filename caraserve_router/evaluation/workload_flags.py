"""The workload's command-line flags, written once for every script that builds a `WorkloadConfig`
(`scripts/replay.py`, `scripts/simulate.py`).

Each flag names its `WorkloadConfig` field, parser and help here; a script gives only its own
defaults, as a `WorkloadConfig` (the replay client: a short run against a small real server;
the simulator: the paper's scale), so where two scripts differ is one visible choice, not two
hand-written parsers drifting apart. The flag strings are the documented ones (`--max-prompt`,
`--length-source`, ...), not the field names.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from caraserve_router.evaluation.workload import ARRIVALS, LENGTHS, POPULARITY, WorkloadConfig


def csv_ints(text: str) -> tuple[int, ...]:
    """`8,16,32` -> (8, 16, 32) (argparse type)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class WorkloadFlag:
    flag: str                     # as users type it
    field: str                    # the WorkloadConfig field it sets
    type: Callable[[str], Any]
    help: str
    choices: Optional[tuple] = None


FLAGS: tuple[WorkloadFlag, ...] = (
    WorkloadFlag("--arrival", "arrival", str, "arrival process: trace (Azure trace timestamps, rescaled to "
                 "--rate when given), poisson, or gamma (gaps with --cv)", ARRIVALS),
    WorkloadFlag("--rate", "rate", float, "requests per second"),
    WorkloadFlag("--cv", "cv", float, "gap coefficient of variation for --arrival gamma"),
    WorkloadFlag("--duration", "duration_s", float, "seconds of arrivals"),
    WorkloadFlag("--max-requests", "num_requests", int, "at most this many requests (none: no cap)"),
    WorkloadFlag("--trace", "trace_path", str, "Azure trace CSV (none: the one in ../shared/traces/)"),
    WorkloadFlag("--length-source", "lengths", str, "prompt/output lengths from sharegpt, the trace, or fixed "
                 "(--prompt-len / --output-len)", LENGTHS),
    WorkloadFlag("--lengths", "lengths_path", str, "ShareGPT lengths CSV (none: the one in ../shared/traces/)"),
    WorkloadFlag("--prompt-scale", "prompt_scale", float, "multiply prompt lengths (then round, then clip)"),
    WorkloadFlag("--output-scale", "output_scale", float, "multiply output lengths (then round, then clip)"),
    WorkloadFlag("--max-prompt", "max_prompt_tokens", int, "clip prompts to this many tokens"),
    WorkloadFlag("--max-output", "max_output_tokens", int, "clip outputs to this many tokens"),
    WorkloadFlag("--prompt-len", "prompt_len", int, "prompt tokens with --length-source fixed"),
    WorkloadFlag("--output-len", "output_len", int, "output tokens with --length-source fixed"),
    WorkloadFlag("--num-adapters", "num_adapters", int, "distinct adapters"),
    WorkloadFlag("--popularity", "popularity", str, "adapter popularity", POPULARITY),
    WorkloadFlag("--alpha", "alpha", float, "power-law alpha, < 1 skews to low indices"),
    WorkloadFlag("--zipf-s", "zipf_s", float, "zipf exponent for --popularity zipf"),
    WorkloadFlag("--ranks", "ranks", csv_ints, "ranks, round robin over adapter indices (comma-separated)"),
    WorkloadFlag("--seed", "seed", int, "seed of every random draw of the workload"),
)


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_workload_arguments(parser: argparse.ArgumentParser, defaults: WorkloadConfig, skip: tuple = (),
                           help_overrides: Optional[dict] = None) -> None:
    """The workload flags (less `skip`, by flag) in their own group, defaulting to `defaults`;
    each parses into `ns.<field>` (`args.seed`, `args.ranks`, ...)."""
    group = parser.add_argument_group("workload")
    for f in FLAGS:
        if f.flag in skip:
            continue
        text = (help_overrides or {}).get(f.flag, f.help)
        group.add_argument(f.flag, dest=f.field, type=f.type, choices=f.choices, default=getattr(defaults, f.field),
                           help=f"{text} (default {_shown(getattr(defaults, f.field))})")


def workload_from_args(ns: argparse.Namespace, defaults: WorkloadConfig, **overrides) -> WorkloadConfig:
    """The WorkloadConfig of the parsed flags (fields without a flag keep `defaults`; WorkloadError
    when the combination is invalid)."""
    given = {f.field: getattr(ns, f.field) for f in FLAGS if hasattr(ns, f.field)}
    return dataclasses.replace(defaults, **{**given, **overrides})
