"""Typed records crossing process boundaries: InstanceStats (the instance's /stats, read by the
front end's scheduler), AdapterRequest and the typed control calls."""
from __future__ import annotations

import json
import pickle

import pytest

from caraserve_router.contracts.adapters import AdapterOp, AdapterRequest
from caraserve_router.contracts.control import AdapterCall, ControlRequest, GetSamples
from caraserve_router.contracts.names import DecodeKernel, LoraMode
from caraserve_router.contracts.stats import InstanceStats, RequestView, ResidentAdapter
from caraserve_router.scheduling.scheduler_state import InstanceState

WIRE = {
    "name": "127.0.0.1:8100", "healthy": True, "lora_mode": "cpu-assist", "kernel": "mbgmv", "device": "cpu",
    "max_batch": 8, "resident_adapters": [{"name": "a", "rank": 8}, {"name": "b", "rank": 16}],
    "running": [{"request_id": "r1", "adapter": "a", "rank": 8, "prompt_tokens": 12, "max_new_tokens": 5,
                 "generated": 2}],
    "queued": [{"request_id": "r2", "adapter": None, "rank": 0, "prompt_tokens": 3, "max_new_tokens": 4,
                "generated": 0}],
    "kv_tokens_used": 40, "kv_tokens_total": 4096, "steps": 17, "uptime_s": 2.5, "lora": {"pages_used": 24},
}


def test_instance_stats_round_trip_keeps_the_wire_format():
    stats = InstanceStats.from_dict(json.loads(json.dumps(WIRE)))
    assert stats.lora_mode is LoraMode.CPU_ASSIST and stats.kernel is DecodeKernel.MBGMV
    assert stats.running == [RequestView("r1", "a", 8, 12, 5, 2)]
    assert stats.resident_adapters[1] == ResidentAdapter("b", 16)
    assert json.loads(json.dumps(stats.to_dict())) == WIRE


def test_the_scheduler_reads_what_the_instance_writes():
    """`InstanceState.apply_stats` (the front end) takes `InstanceStats.to_dict()` as is."""
    inst = InstanceState("i0", max_batch=2, lora_mode="cached", kernel="bgmv")
    inst.apply_stats(InstanceStats.from_dict(WIRE).to_dict())
    assert (inst.lora_mode, inst.kernel, inst.max_batch) == ("cpu-assist", "mbgmv", 8)
    assert set(inst.running) == {"r1"} and set(inst.queued) == {"r2"}
    assert dict(inst.resident) == {"a": 8, "b": 16}


def test_request_ids_are_mapped_for_the_front_end():
    stats = InstanceStats.from_dict({**WIRE, "running": [{**WIRE["running"][0], "request_id": 8}]})
    mapped = stats.with_request_ids(lambda rid: {8: "front-8"}.get(rid, str(rid)))
    assert [r.request_id for r in mapped.running + mapped.queued] == ["front-8", "r2"]
    assert stats.running[0].request_id == 8  # the original is untouched


@pytest.mark.parametrize("field,value", [("lora_mode", "lazy"), ("kernel", "sgmv"), ("max_batch", -1),
                                         ("healthy", "yes"), ("running", [{"request_id": 1.5}]),
                                         ("resident_adapters", [{"name": "a", "rank": "8"}]),
                                         ("queued", [{**WIRE["queued"][0], "generated": True}])])
def test_malformed_stats_name_the_field(field, value):
    with pytest.raises(ValueError, match=field if field not in ("lora_mode", "kernel") else "stats"):
        InstanceStats.from_dict({**WIRE, field: value})


def test_adapter_request_is_checked_once_and_travels_intact():
    req = AdapterRequest.from_info("lora-a", {"rank": 8, "lora_int_id": 3, "path": "/x"})
    assert (req.name, req.id, req.rank) == ("lora-a", 3, 8)
    assert pickle.loads(pickle.dumps(req)) == req  # crosses zmq pickled
    for bad in ({"name": ""}, {"name": "../x"}, {"name": "a", "id": -1}, {"name": "a", "rank": 0},
                {"name": 5}):
        with pytest.raises(ValueError):
            AdapterRequest(**bad)


def test_control_calls_are_typed():
    call = AdapterCall("add", "a", "/abs/path")
    assert call.op is AdapterOp.ADD
    assert pickle.loads(pickle.dumps(ControlRequest(1, call))).call == call
    assert GetSamples(True).clear
    with pytest.raises(ValueError):
        AdapterCall("register", "a", "/p")  # not an operation
    with pytest.raises(ValueError):
        AdapterCall(AdapterOp.ADD, "a")  # ADD needs a path
    with pytest.raises(ValueError):
        AdapterCall(AdapterOp.REMOVE, "bad name!")
    assert AdapterCall(AdapterOp.LIST).name == ""
