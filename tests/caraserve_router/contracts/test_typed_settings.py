"""Typed settings: the LoRA mode and decode kernel are enums from the flags to the engine (parsed
once, in the config dataclass), every table keyed by the mode covers every mode, and chunked
prefill is one property."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, add_arguments, from_namespace, to_cli
from caraserve_router.contracts.names import DecodeKernel, LoraMode
from caraserve_router.evaluation.sim_instance import PREFILL_WITH_COLD
from caraserve_router.lora.modes import MODES, mode_for
from caraserve_router.scheduling.policies import COLD_START_COST

# Every table that gives a mode its meaning somewhere; a new LoraMode member missing from one
# of them (the simulator, the router's cost model, the engine's policies) fails here.
MODE_TABLES = {
    "lora.modes.MODES": MODES,
    "scheduling.policies.COLD_START_COST": COLD_START_COST,
    "evaluation.sim_instance.PREFILL_WITH_COLD": PREFILL_WITH_COLD,
}


@pytest.mark.parametrize("table", sorted(MODE_TABLES))
def test_every_mode_is_in_each_table(table):
    keys = MODE_TABLES[table]
    assert all(isinstance(k, LoraMode) for k in keys), f"{table} is keyed by something else than LoraMode"
    missing = [m.value for m in LoraMode if m not in keys]
    assert not missing, f"{table} lacks {missing}"


@pytest.mark.parametrize("mode", list(LoraMode))
def test_each_policy_is_its_modes(mode):
    assert mode_for(mode).kind is mode


def _parse(argv: list[str]) -> LoRAConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, LoRAConfig, prefix="lora_")
    return from_namespace(LoRAConfig, parser.parse_args(argv), prefix="lora_")


@pytest.mark.parametrize("mode", list(LoraMode))
@pytest.mark.parametrize("kernel", list(DecodeKernel))
def test_flags_give_the_enums_and_to_cli_gives_the_flags_back(mode, kernel):
    cfg = _parse(["--lora-mode", mode.value, "--lora-decode-kernel", kernel.value])
    assert cfg.mode is mode and cfg.decode_kernel is kernel
    flags = to_cli(cfg, prefix="lora_")
    assert flags[flags.index("--lora-mode") + 1] == mode.value  # the CLI string, not "LoraMode.X"
    assert flags[flags.index("--lora-decode-kernel") + 1] == kernel.value
    assert _parse(flags) == cfg


def test_every_way_of_building_the_config_holds_the_enum():
    default = LoRAConfig()
    assert default.mode is LoraMode.AUTO and default.decode_kernel is DecodeKernel.MBGMV  # auto: issue 25
    by_string = LoRAConfig(mode="pipeline", decode_kernel="bgmv")
    assert by_string.mode is LoraMode.PIPELINE and by_string.decode_kernel is DecodeKernel.BGMV
    assert dataclasses.replace(default, mode="cached").mode is LoraMode.CACHED
    assert LoRAConfig(**vars(by_string)) == by_string  # how the launchers copy a template


def test_a_bad_value_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"lora mode must be one of \('cached', 'on-demand'"):
        LoRAConfig(mode="lazy")
    with pytest.raises(ValueError, match=r"decode kernel must be one of \('bgmv', 'mbgmv'\)"):
        LoRAConfig(decode_kernel="sgmv")
    with pytest.raises(SystemExit) as exit_info:  # argparse: "invalid choice", status 2
        _parse(["--lora-mode", "lazy"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("tokens,on", [(0, False), (1, True), (256, True)])
def test_chunked_prefill_is_one_property(tokens, on):
    assert InstanceConfig(prefill_chunk_tokens=tokens).chunked_prefill is on
