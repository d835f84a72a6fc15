"""What keeps a cluster's instances closed and their ports race-free, without servers: the
instance key middleware, ports an instance binds itself, the one instance command line, the
host's cores split between instances, adapters shipped to an instance on first use, and
`--cluster ray` without Ray."""
from __future__ import annotations

import asyncio
import os
import socket

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from caraserve_router.contracts.configs import InstanceConfig, LoRAConfig, instance_command, parse_cores
from caraserve_router.contracts.instance_auth import InstanceAuth, auth_headers
from caraserve_router.contracts.processes import bind_listening, read_port_file, write_port_file
from caraserve_router.frontend.adapter_registry import AdapterInfo
from caraserve_router.frontend.cluster import host_core_shares
from caraserve_router.frontend.core_claims import claim_cores, release_cores
from caraserve_router.frontend.instance_client import InstanceError
from caraserve_router.frontend.ray_adapters import OnUseAdapters, OnUseLoader


def test_instance_routes_need_the_key_but_health_and_metrics():
    app = FastAPI()
    for path in ("/generate", "/health", "/metrics", "/v1/models"):
        app.get(path)(lambda: {"ok": True})
    client = TestClient(InstanceAuth(app, "s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for path in ("/generate", "/v1/models"):
            r = client.get(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/generate", "/v1/models", "/health", "/metrics"):
        assert client.get(path, headers=auth_headers("s3cret")).json() == {"ok": True}
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    with pytest.raises(ValueError):
        InstanceAuth(app, "")


def test_an_instance_binds_the_next_free_port_itself(tmp_path):
    taken = bind_listening("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        mine = bind_listening("127.0.0.1", port)  # taken: the next free one above it
        assert port < mine.getsockname()[1] < port + 64
        # it listens already: a connection is queued before anyone calls accept()
        socket.create_connection(("127.0.0.1", mine.getsockname()[1]), timeout=5).close()
        mine.close()
    finally:
        taken.close()
    path = str(tmp_path / "port")
    assert read_port_file(path) == 0
    write_port_file(path, 43210)
    assert read_port_file(path) == 43210 and os.listdir(tmp_path) == ["port"]


def test_one_instance_command_line_round_trips():
    from lightllm_patches.instance import config_from_args

    config = InstanceConfig(model_dir="/m", port=0, port_file="/tmp/p", cpu_cores="2-3", adapter_roots="/a,/b",
                            lora=LoRAConfig(mode="pipeline", adapter_dir=None, pool_mb=4.0))
    cmd = instance_command(config, python="py")
    assert cmd[:3] == ["py", "-m", "lightllm_patches.instance"]
    assert config_from_args(cmd[3:]) == config
    assert not any("KEY" in part.upper() for part in cmd), "the instance key never goes on a command line"


def test_host_cores_are_split_into_disjoint_shares(tmp_path):
    assert parse_cores("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_cores("3-1")
    shares = [parse_cores(s) for s in host_core_shares(3, list(range(8)))]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert host_core_shares(3, [0, 1]) == ["0", "1", "0"]  # more instances than cores: round robin
    # Ray actors of one host claim what Ray reserved for each, disjoint while cores last
    path = str(tmp_path / "claims.json")
    me, parent = os.getpid(), os.getppid()
    a = claim_cores(2, me, path, cores=[0, 1, 2, 3])
    b = claim_cores(2, parent, path, cores=[0, 1, 2, 3])
    assert a == [0, 1] and b == [2, 3]
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process; its claim is free again
    assert claim_cores(2, dead, path, cores=[0, 1, 2, 3, 4, 5]) == [4, 5]
    assert claim_cores(2, me, path, cores=[0, 1, 2, 3, 4, 5]) == [0, 1]  # its own claim replaced, not added
    assert claim_cores(1, 1, path, cores=[0, 1, 2, 3, 4, 5]) == [4]  # the dead pid's cores
    release_cores(me, path)
    assert claim_cores(2, 1, path, cores=[0, 1, 2, 3, 4, 5]) == [0, 1]


def test_an_adapter_is_loaded_on_its_first_use_once_per_instance_process(tmp_path):
    on_use = OnUseAdapters(resolver_dir=str(tmp_path))
    on_use.adapters["a"] = AdapterInfo(8, ["q_proj"], "/front/a", on_use=True)
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "adapter_config.json").write_text('{"r": 4, "target_modules": ["v_proj", "q_proj"]}')
    loads = []

    async def load(name, path):
        loads.append((name, path))
        await asyncio.sleep(0.01)
        return {}

    async def run():
        loader = OnUseLoader(on_use)
        await asyncio.gather(*(loader.ensure("a", 100, load) for _ in range(5)))  # concurrent first requests
        await loader.ensure("a", 100, load)
        await loader.ensure(None, 100, load)  # the base model
        await loader.ensure("unknown", 100, load)  # not registered on use: left to the instance
        await loader.ensure("a", 101, load)  # a restarted instance process has none
        await loader.ensure("late", 101, load)  # the resolver, from the front end's directory

        async def refused(name, path):
            raise InstanceError(400, {"error": {"message": "bad adapter"}})

        with pytest.raises(InstanceError):
            await loader.ensure("late", 102, refused)
        return loader

    loader = asyncio.run(run())
    assert loads == [("a", "/front/a"), ("a", "/front/a"), ("late", str(tmp_path / "late"))]
    assert on_use.adapters["late"].rank == 4 and on_use.adapters["late"].target_modules == ["q_proj", "v_proj"]
    assert "late" not in loader.loaded
    assert on_use.resolve("../etc") is None and on_use.resolve("missing") is None


def test_cluster_ray_without_ray_is_a_one_line_error(monkeypatch, capsys):
    from caraserve_router.frontend import lifecycle, ray_config

    real = ray_config.importlib.util.find_spec
    monkeypatch.setattr(ray_config.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else
                        real(name, *a))
    assert lifecycle.main(["--cluster", "ray", "--instances", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("caraserve: error: --cluster ray needs Ray") and "pip install" in err[0]
