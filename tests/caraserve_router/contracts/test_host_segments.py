"""One host copy of each adapter: the shared-segment protocol (contracts.host_segments), and two
AdapterStores of one host given the same prefix mapping one segment per adapter."""
from __future__ import annotations

import multiprocessing as mp
import os
import uuid

import pytest
import torch

from caraserve_router.contracts.processes import remove_shm
from caraserve_router.contracts import host_segments
from caraserve_router.lora.adapter_store import AdapterStore, HostAdapter
from caraserve_router.lora.shapes import ModelShapes
from tests import fixtures


@pytest.fixture
def prefix():
    p = f"caraserve_test_seg_{uuid.uuid4().hex[:8]}"
    yield p
    assert remove_shm(p) == [], "segments left behind"


def names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(host_segments.SHM_DIR) if n.startswith(prefix))


def pattern(seed: int, size: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))


def filler(seed: int, calls: list):
    def fill(segment):
        calls.append(seed)
        segment.buf[:] = pattern(seed, segment.size)
    return fill


def test_second_user_shares_the_first_copy_and_the_last_one_unlinks(prefix):
    name, calls = f"{prefix}_a", []
    first = host_segments.attach_or_make(name, 4096, filler(1, calls))
    second = host_segments.attach_or_make(name, 4096, filler(2, calls))
    assert calls == [1] and bytes(second.buf) == pattern(1, 4096)  # one read: the second attached
    assert names(prefix) == [name]
    assert first.close() is False  # the other still maps it: the name stays
    assert names(prefix) == [name] and bytes(second.buf) == pattern(1, 4096)
    assert second.close() is True and names(prefix) == []


def test_a_failed_fill_publishes_nothing(prefix):
    def broken(segment):
        segment.buf[:10] = b"x" * 10
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        host_segments.attach_or_make(f"{prefix}_b", 4096, broken)
    assert names(prefix) == []  # neither the name nor the temporary file
    calls = []
    seg = host_segments.attach_or_make(f"{prefix}_b", 4096, filler(3, calls))
    assert calls == [3] and bytes(seg.buf) == pattern(3, 4096)
    seg.close()


def test_remove_idle_spares_what_is_mapped(prefix):
    held = host_segments.attach_or_make(f"{prefix}_held", 64, filler(4, []))
    with open(os.path.join(host_segments.SHM_DIR, f"{prefix}_orphan"), "wb") as f:  # a killed user's
        f.write(b"\0" * 64)
    assert host_segments.remove_idle(prefix) == [f"{prefix}_orphan"]
    assert names(prefix) == [f"{prefix}_held"] and bytes(held.buf) == pattern(4, 64)
    held.close()


def test_a_wrong_size_is_refused(prefix):
    seg = host_segments.attach_or_make(f"{prefix}_c", 64, filler(5, []))
    with pytest.raises(OSError, match="holds 64 bytes, expected 128"):
        host_segments.attach_or_make(f"{prefix}_c", 128, filler(6, []))
    seg.close()


def _churn(prefix: str, rounds: int, out) -> None:
    """Map, check and unmap three segments over and over, as instances using adapters in turn do."""
    made, bad = 0, 0
    for i in range(rounds):
        seed = i % 3
        calls = []
        seg = host_segments.attach_or_make(f"{prefix}_{seed}", 8192, filler(seed, calls))
        made += len(calls)
        if bytes(seg.buf) != pattern(seed, 8192):
            bad += 1
        seg.close()
    out.put((made, bad))


def test_processes_mapping_and_unmapping_at_once_always_see_whole_copies(prefix):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_churn, args=(prefix, 300, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(bad == 0 for _, bad in results), results
    assert names(prefix) == []  # every copy was unlinked by its last user


# ---------------------------------------------------------------- two stores of one host

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model_dir, dirs = fixtures.tiny_llama_with_adapters(tmp_path_factory.mktemp("shared"), ranks=(4, 8))
    return model_dir, dirs


def make_store(model_dir, prefix):
    return AdapterStore(ModelShapes.from_model_dir(str(model_dir)), torch.float32, prefix, max_rank=16, pin=False)


def test_two_instances_of_a_host_map_one_copy(base, prefix):
    model_dir, dirs = base
    one, two = make_store(model_dir, prefix), make_store(model_dir, prefix)
    try:
        for s in (one, two):
            s.add("x", str(dirs[0]))
            s.add("y", str(dirs[1]))
        a = one.materialize("x")
        b = two.materialize("x")
        assert a.shm_name == b.shm_name and len(names(prefix)) == 1
        assert one.counters["host_reads"] == 1 and two.counters["host_shared_hits"] == 1
        assert two.counters["host_reads"] == 0
        assert torch.equal(a.flat, b.flat) and a.flat.abs().sum() > 0
        # a worker of the CPU sidecar attaches by name, as for a private copy
        worker = HostAdapter.attach(a.spec, one.shapes, torch.float32, a.shm_name)
        assert torch.equal(worker.flat, a.flat)
        worker.close()
        two.materialize("y")  # another adapter: another segment
        assert len(names(prefix)) == 2
        one.remove("x")  # the other instance still maps x
        assert len(names(prefix)) == 2 and torch.equal(b.flat, two.get("x").flat)
        two.remove("x")
        assert len(names(prefix)) == 1
    finally:
        one.close()
        two.close()
    assert names(prefix) == []


def test_a_rewritten_file_is_a_new_copy(base, prefix, tmp_path):
    import shutil
    model_dir, dirs = base
    path = tmp_path / "a"
    shutil.copytree(dirs[0], path)
    one, two = make_store(model_dir, prefix), make_store(model_dir, prefix)
    try:
        one.add("x", str(path))
        first = one.materialize("x").shm_name
        shutil.copy(dirs[1] / "adapter_model.safetensors", path / "adapter_model.safetensors.new")
        shutil.copy(dirs[1] / "adapter_config.json", path / "adapter_config.json")
        os.replace(path / "adapter_model.safetensors.new", path / "adapter_model.safetensors")
        two.add("x", str(path))
        assert two.materialize("x").shm_name != first  # not the old bytes under the old name
        assert two.counters["host_reads"] == 1
    finally:
        one.close()
        two.close()


# ---------------------------------------------------------------- a directory held together

def test_shared_dir_is_written_once_and_removed_by_the_last_holder(tmp_path):
    path = str(tmp_path / "shared")
    one, two = host_segments.SharedDir(path), host_segments.SharedDir(path)
    writes = []

    def write(tmp):
        writes.append(tmp)
        (tmp_path / "shared" / os.path.basename(tmp) / "f").write_text("data")

    a = one.put_dir("x", write)
    b = two.put_dir("x", write)
    assert a == b and len(writes) == 1 and open(os.path.join(a, "f")).read() == "data"
    assert sorted(os.listdir(path)) == ["x"]  # no temporary directory left

    def broken(tmp):
        raise ValueError("bad files")

    with pytest.raises(ValueError):
        one.put_dir("y", broken)
    assert sorted(os.listdir(path)) == ["x"]
    assert one.release() is False and os.path.isdir(a)  # two still holds it
    assert two.release() is True and not os.path.exists(path)


def test_directories_that_hard_link_one_file_stay_separate_adapters(base, prefix, tmp_path):
    """Two directories are two adapters (each its own copy) even when they share a file: their
    configs may differ (here lora_alpha, which is folded into the bytes)."""
    import json
    model_dir, dirs = base
    for name, alpha_factor in (("p", 1), ("q", 2)):
        (tmp_path / name).mkdir()
        os.link(dirs[0] / "adapter_model.safetensors", tmp_path / name / "adapter_model.safetensors")
        config = json.loads((dirs[0] / "adapter_config.json").read_text())
        config["lora_alpha"] = config["lora_alpha"] * alpha_factor
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
    store = make_store(model_dir, prefix)
    try:
        p, q = store.add("p", str(tmp_path / "p")), store.add("q", str(tmp_path / "q"))
        assert p.shm_name != q.shm_name and len(names(prefix)) == 2
        assert not torch.equal(p.flat, q.flat)  # B scaled by a different alpha / r
    finally:
        store.close()
