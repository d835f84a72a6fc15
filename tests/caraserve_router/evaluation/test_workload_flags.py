"""The workload flags are written once (`evaluation/workload_flags.py`): each sets its
WorkloadConfig field, a script's defaults are a WorkloadConfig, and replay.py and simulate.py
both take their workload flags from there."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from caraserve_router.evaluation.workload import WorkloadConfig, WorkloadError
from caraserve_router.evaluation.workload_flags import FLAGS, add_workload_arguments, workload_from_args

REPO = Path(__file__).resolve().parents[3]
# fields no script sets from the command line (the lower clipping bounds, the adapter names)
NOT_FLAGS = {"min_prompt_tokens", "min_output_tokens", "adapter_prefix"}
# a value unlike any default for each flag, and what the field then holds
GIVEN = {"--arrival": ("gamma", "gamma"), "--rate": ("3.5", 3.5), "--cv": ("2", 2.0), "--duration": ("7", 7.0),
         "--max-requests": ("9", 9), "--trace": ("t.csv", "t.csv"), "--length-source": ("fixed", "fixed"),
         "--lengths": ("l.csv", "l.csv"), "--prompt-scale": ("0.25", 0.25), "--output-scale": ("3", 3.0),
         "--max-prompt": ("77", 77), "--max-output": ("55", 55), "--prompt-len": ("11", 11),
         "--output-len": ("13", 13), "--num-adapters": ("5", 5), "--popularity": ("zipf", "zipf"),
         "--alpha": ("0.9", 0.9), "--zipf-s": ("1.5", 1.5), "--ranks": ("4,12", (4, 12)), "--seed": ("42", 42)}


def parse(argv, defaults=WorkloadConfig(), skip=()):
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser, defaults, skip=skip)
    return workload_from_args(parser.parse_args(argv), defaults)


def test_every_field_but_the_fixed_ones_has_a_flag():
    fields = {f.name for f in dataclasses.fields(WorkloadConfig)}
    assert {f.field for f in FLAGS} == fields - NOT_FLAGS
    assert sorted(GIVEN) == sorted(f.flag for f in FLAGS)


@pytest.mark.parametrize("flag", [f.flag for f in FLAGS])
def test_each_flag_sets_its_field_and_nothing_else(flag):
    field = next(f.field for f in FLAGS if f.flag == flag)
    text, value = GIVEN[flag]
    cfg = parse([flag, text])
    assert getattr(cfg, field) == value
    assert dataclasses.replace(cfg, **{field: getattr(WorkloadConfig(), field)}) == WorkloadConfig()


def test_a_scripts_defaults_are_its_config_and_skipped_flags_keep_them():
    defaults = WorkloadConfig(arrival="trace", rate=1.0, prompt_scale=0.5, max_prompt_tokens=1024)
    assert parse([], defaults) == defaults
    with pytest.raises(SystemExit):
        parse(["--rate", "4"], defaults, skip=("--rate",))
    assert parse(["--seed", "3"], defaults, skip=("--rate",)) == dataclasses.replace(defaults, seed=3)


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):
        parse(["--arrival", "burst"])
    with pytest.raises(SystemExit):
        parse(["--ranks", "8,x"])
    with pytest.raises(WorkloadError, match="needs a rate"):
        parse(["--arrival", "poisson"], WorkloadConfig(rate=None, arrival="trace"))


@pytest.mark.parametrize("script,skipped", [("replay.py", set()), ("simulate.py", {"--rate"})])
def test_the_scripts_take_their_workload_flags_from_here(script, skipped):
    spec = importlib.util.spec_from_file_location(script[:-3] + "_script", REPO / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    group = next(g for g in parser._action_groups if g.title == "workload")
    assert {a.option_strings[0] for a in group._group_actions} == {f.flag for f in FLAGS} - skipped
    assert workload_from_args(parser.parse_args([]), module.WORKLOAD_DEFAULTS) == module.WORKLOAD_DEFAULTS
