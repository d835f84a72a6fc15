"""scripts/bench/common.py: server flags a benchmark passes through keep the server's names,
choices and defaults given by the benchmark, and come back as the server's command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, SidecarConfig
from caraserve_router.contracts.names import LoraMode

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(BENCH))  # as `python scripts/bench/<name>.py` has it
    try:
        import common as module
        yield module
    finally:
        sys.path.remove(str(BENCH))


FLAGS = ((InstanceConfig(), ("prefill_chunk_tokens",), ""), (SidecarConfig(workers=1), ("workers",), "sidecar_"),
         (LoRAConfig(mode="pipeline", prefetch=False), ("mode", "prefetch"), "lora_"))


def parsed(common, argv):
    parser = argparse.ArgumentParser()
    for defaults, fields, prefix in FLAGS:
        common.add_server_arguments(parser, defaults, fields, prefix)
    return parser.parse_args(argv)


def command_line(common, args):
    return [flag for d, fields, prefix in FLAGS for flag in common.server_flags(args, d, fields, prefix)]


def test_the_benchmarks_defaults_become_the_servers_flags(common):
    assert command_line(common, parsed(common, [])) == [
        "--prefill-chunk-tokens", "256", "--sidecar-workers", "1", "--lora-mode", "pipeline", "--no-lora-prefetch"]


def test_given_values_come_back_checked_and_typed(common):
    args = parsed(common, ["--prefill-chunk-tokens", "0", "--lora-mode", "cpu-assist", "--lora-prefetch"])
    assert command_line(common, args) == [
        "--prefill-chunk-tokens", "0", "--sidecar-workers", "1", "--lora-mode", "cpu-assist", "--lora-prefetch"]
    with pytest.raises(SystemExit):
        parsed(common, ["--lora-mode", "lazy"])  # the server's choices
    with pytest.raises(SystemExit):
        parsed(common, ["--lora-pool-mb", "4"])  # not a field this benchmark passes through


def test_short_benchmark_flags_give_the_servers_long_ones(common):
    defaults, fields = LoRAConfig(mode="cpu-assist", pool_mb=2048.0), ("mode", "pool_mb")
    parser = argparse.ArgumentParser()
    common.add_server_arguments(parser, defaults, fields)  # --mode, --pool-mb
    args = parser.parse_args(["--mode", "cached"])
    assert common.server_flags(args, defaults, fields, server_prefix="lora_") == [
        "--lora-mode", "cached", "--lora-pool-mb", "2048.0"]


def test_write_result_makes_folders_and_writes_enums_as_their_strings(common, tmp_path):
    path = common.write_result(tmp_path / "a" / "b.json", {"mode": LoraMode.CPU_ASSIST, "where": tmp_path / "x"})
    assert json.loads(path.read_text()) == {"mode": "cpu-assist", "where": str(tmp_path / "x")}
    assert set(common.machine()) == {"platform", "machine", "cpus", "python"}
