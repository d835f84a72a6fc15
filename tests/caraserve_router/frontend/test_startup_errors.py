"""A front end whose instance cannot start exits with status 2 and the instance's own error,
not a CancelledError traceback, and leaves no process or /dev/shm entry behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from caraserve_router.contracts.processes import free_ports

pytestmark = pytest.mark.slow


def test_instance_start_failure_is_a_clear_error(tiny_llama_dir, tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "broken").mkdir(parents=True)
    (adapters / "broken" / "adapter_config.json").write_text(json.dumps(
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    (adapters / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    # its own /dev/shm names: other servers on the machine make "caraserve..." names meanwhile
    prefix = f"cs_startup_{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "caraserve_router.api_server", "--model-dir", str(tiny_llama_dir),
         "--adapters", str(adapters), "--adapter-roots", str(tmp_path), "--port", str(free_ports(1)[0]),
         "--policy", "round-robin", "--log-dir", str(tmp_path / "logs"), "--shm-prefix", prefix],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 2, stderr[-3000:]
    assert "caraserve: error: instance 0 exited during start-up" in stderr
    assert "broken" in stderr, "the instance's reason (the adapter it could not read) is shown"
    assert "CancelledError" not in stderr
    left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert not left, left
    ps = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True).stdout.split()
    assert not any(int(g) == proc.pid for g in ps), "its process group is gone"


def test_a_busy_port_is_refused_before_any_instance_starts(tiny_llama_dir, tmp_path):
    from caraserve_router.contracts.processes import bind_listening

    taken = bind_listening("127.0.0.1", 0)  # held by this test for the whole run
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "caraserve_router.api_server", "--model-dir", str(tiny_llama_dir),
             "--port", str(port), "--policy", "round-robin", "--log-dir", str(tmp_path / "logs"),
             "--shm-prefix", f"cs_busyport_{uuid.uuid4().hex[:8]}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, start_new_session=True)
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"caraserve: error: cannot serve on 127.0.0.1:{port}" in done.stderr
    assert "started instance" not in done.stderr, "refused before starting instances"
