"""AdapterStore: PEFT adapters are validated against the base model and bad ones refused clearly."""
from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

from caraserve_router.lora.adapter_store import AdapterError, AdapterStore
from caraserve_router.lora.shapes import ModelShapes
from caraserve_router.contracts.processes import remove_shm
from tests import fixtures
from tests.testing import wait_until


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    model_dir, dirs = fixtures.tiny_llama_with_adapters(root, ranks=(4,))
    return model_dir, dirs[0]


@pytest.fixture
def store(base):
    prefix = f"caraserve_test_{uuid.uuid4().hex[:8]}"
    s = AdapterStore(ModelShapes.from_model_dir(str(base[0])), torch.float32, prefix, max_rank=16, pin=False)
    yield s
    s.close()
    assert remove_shm(prefix) == [], "the store must unlink its segments"


def broken_copy(good, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    edit(bad)
    return bad


def _edit_tensors(change):
    def edit(d):
        tensors = load_file(d / "adapter_model.safetensors")
        change(tensors)
        save_file(tensors, d / "adapter_model.safetensors")
    return edit


def _edit_config(change):
    def edit(d):
        config = json.loads((d / "adapter_config.json").read_text())
        change(config)
        (d / "adapter_config.json").write_text(json.dumps(config))
    return edit


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD_ADAPTERS = {
    "missing config": (lambda d: os.remove(d / "adapter_config.json"), "missing adapter_config.json"),
    "missing weights": (lambda d: os.remove(d / "adapter_model.safetensors"), "missing adapter_model.safetensors"),
    "truncated weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:1000]), "truncated or corrupt"),
    "missing tensor": (_edit_tensors(lambda t: t.pop(KEY)), "layer 0 q_proj has no lora_A"),
    "extra tensor": (_edit_tensors(lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)})),
                     "unexpected tensor"),
    "wrong shape": (_edit_tensors(lambda t: t.update({KEY: torch.zeros(4, 65)})), "do not fit the base model"),
    "rank 0": (_edit_config(lambda c: c.update(r=0)), "positive integer"),
    "unsupported module": (_edit_config(lambda c: c.update(target_modules=["q_proj", "embed_tokens"])),
                           "unsupported target module"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{oops"), "not valid JSON"),
    "too large rank": (_edit_config(lambda c: c.update(r=32)), "exceeds this server's max rank"),
    "dora": (_edit_config(lambda c: c.update(use_dora=True)), "DoRA"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_by_name(store, base, tmp_path, case):
    edit, message = BAD_ADAPTERS[case]
    bad = broken_copy(base[1], tmp_path, edit)
    with pytest.raises(AdapterError, match=message) as err:
        store.add("bad", str(bad))
    assert err.value.status == 400
    assert "bad" not in store


def test_missing_path(store):
    with pytest.raises(AdapterError, match="does not exist"):
        store.add("x", "/no/such/adapter")


def test_duplicate_and_unknown_names(store, base):
    store.add("a", str(base[1]))
    with pytest.raises(AdapterError) as err:
        store.add("a", str(base[1]))
    assert err.value.status == 409
    with pytest.raises(AdapterError) as err:
        store.get("nope")
    assert err.value.status == 404


def test_layout_holds_scaled_weights(store, base):
    """Host blocks hold lora_A rows and scale * lora_B columns where the layout says."""
    host = store.add("a", str(base[1]))
    config = json.loads((base[1] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(base[1] / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.k_proj"
    a = host.block(1, "qkv", "A")  # [sum r, IN]: q rows, k rows, v rows
    b = host.block(1, "qkv", 1)    # [r_k, OUT_k]
    torch.testing.assert_close(a[4:8], tensors[prefix + ".lora_A.weight"])
    torch.testing.assert_close(b, scale * tensors[prefix + ".lora_B.weight"].t())
    assert host.spec.rank == 4 and host.spec.slice_ranks["qkv"] == (4, 4, 4)
    assert host.nbytes == sum(t.numel() * 4 for t in tensors.values()), "the segment holds the tensors' bytes only"


@pytest.mark.parametrize("which, value", [("lora_A", float("nan")), ("lora_B", float("inf"))])
def test_non_finite_data_is_refused_on_first_use(store, base, tmp_path, which, value):
    """Registration reads no data, so NaN / inf are found when the bytes are first read: a clear
    error naming the module, and no segment left behind."""
    def poison(t):
        key = f"base_model.model.model.layers.1.self_attn.k_proj.{which}.weight"
        t[key] = t[key].clone()
        t[key][0, 1] = value
    bad = broken_copy(base[1], tmp_path, _edit_tensors(poison))
    store.add("bad", str(bad))  # the header is fine
    with pytest.raises(AdapterError, match="layer 1 k_proj holds NaN or inf"):
        store.materialize("bad")
    assert not store.get("bad").mapped
    assert [n for n in os.listdir("/dev/shm") if n.startswith(store.shm_prefix)] == []


def test_background_read_never_blocks_the_caller(store, base, monkeypatch):
    """start_read returns at once while the file is read on the store's reader thread (here held
    until released); finish_read maps the bytes on the caller's thread when it is done."""
    import threading
    from caraserve_router.lora import adapter_store

    release, threads = threading.Event(), []
    real_read = adapter_store.read_into

    def held_read(host, found, ranks):
        threads.append(threading.current_thread().name)
        assert release.wait(30)
        real_read(host, found, ranks)

    monkeypatch.setattr(adapter_store, "read_into", held_read)
    mapped = []
    store.on_map = lambda host: mapped.append((host.spec.name, threading.current_thread().name))
    host = store.add("a", str(base[1]))
    assert store.start_read("a") is False and store.reading("a")
    assert store.start_read("a") is False  # one read, not two
    assert store.finish_read("a") is False and not host.mapped
    release.set()
    assert wait_until(lambda: store.finish_read("a"), 30)
    assert threads == ["adapter-read_0"] and mapped == [("a", threading.current_thread().name)]
    assert host.mapped and not store.reading("a") and store.counters["host_reads"] == 1
    ref = AdapterStore(store.shapes, torch.float32, store.shm_prefix + "_ref", max_rank=16, pin=False)
    try:
        ref.add("a", str(base[1]))
        assert torch.equal(ref.materialize("a").flat, host.flat)
    finally:
        ref.close()
    assert store.start_read("a") is True  # mapped: nothing to wait for


def test_background_read_of_a_bad_file_fails_on_finish(store, base, tmp_path):
    def poison(t):
        key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        t[key] = torch.full_like(t[key], float("nan"))
    bad = broken_copy(base[1], tmp_path, _edit_tensors(poison))
    store.add("bad", str(bad))
    store.start_read("bad")

    def finished():
        try:
            return store.finish_read("bad")
        except AdapterError as e:
            finished.error = e
            return True

    assert wait_until(finished, 30)
    assert "layer 0 down_proj holds NaN or inf" in str(finished.error)
    assert not store.get("bad").mapped and not store.reading("bad")


def test_removed_while_reading_leaves_no_segment(store, base):
    store.add("a", str(base[1]))
    store.start_read("a")
    store.remove("a")
    store.close()  # waits for the reader: its segment is closed, not leaked
    assert [n for n in os.listdir("/dev/shm") if n.startswith(store.shm_prefix)] == []
