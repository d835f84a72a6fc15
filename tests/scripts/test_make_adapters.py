"""Demo / random PEFT LoRA adapters (caraserve_router.assets.demo_adapters, scripts/make_adapters.py).

The reference for what an adapter does is a merge written here from the raw safetensors file
and adapter_config.json (W + scaling * B @ A, scaling computed from r / lora_alpha /
rank_pattern / alpha_pattern / use_rslora by this file's own rule), compared with PEFT
loading the adapter.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caraserve_router.assets import demo_adapters
from caraserve_router.assets.demo_adapters import make_demo_adapters, make_random_adapter
from tests import fixtures
from tests.testing import assert_close

REPO = Path(__file__).resolve().parents[2]
MAKE = REPO / "scripts" / "make_adapters.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return fixtures.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=3)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32, local_files_only=True).eval()


IDS = torch.tensor([[1, 504, 3575, 282, 4649, 314, 33, 34, 2]])


def expected_scalings(acfg: dict) -> dict[str, tuple[int, float]]:
    """proj -> (rank, scaling) by PEFT's documented rule, from adapter_config.json."""
    out = {}
    for proj in acfg["target_modules"]:
        r = acfg["rank_pattern"].get(proj, acfg["r"])
        alpha = acfg["alpha_pattern"].get(proj, acfg["lora_alpha"])
        out[proj] = (r, alpha / (math.sqrt(r) if acfg["use_rslora"] else r))
    return out


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """HF weight name -> scaling * B @ A, from the files alone."""
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scal = expected_scalings(acfg)
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key in sd:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        proj = module.rsplit(".", 1)[1]
        a, b = sd[key].double(), sd[key.replace("lora_A", "lora_B")].double()
        r, s = scal[proj]
        assert a.shape[0] == r and b.shape[1] == r, key
        deltas[module + ".weight"] = s * (b @ a)
    return deltas


def merged_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64, local_files_only=True).eval()
    sd = model.state_dict()
    for name, d in lora_deltas(adapter_dir).items():
        sd[name] = sd[name] + d
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(ids).logits


def peft_logits(base_model, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base_model, str(adapter_dir))
    try:
        with torch.no_grad():
            return pm(ids).logits
    finally:
        pm.unload()


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=str(REPO))


# ------------------------------------------------------------------------------------------
# make_random_adapter


@pytest.mark.parametrize("kw", [
    dict(rank=4),
    dict(rank=8, target_modules="q,v", lora_alpha=4.0),
    dict(rank=4, target_modules="attn", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0}, use_rslora=True),
    dict(rank=2, target_modules="mlp", layers_to_transform=[0, 2]),
], ids=["all", "qv-alpha", "patterns-rslora", "mlp-layers"])
def test_adapter_matches_manual_merge(tiny, tiny_model, tmp_path, kw):
    d = make_random_adapter(tiny_model, tmp_path / "a", seed=7, **kw)
    acfg = json.loads((d / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == kw["rank"]
    assert acfg["lora_alpha"] == kw.get("lora_alpha", 2 * kw["rank"])
    assert set(acfg["target_modules"]) == set(demo_adapters.parse_targets(kw.get("target_modules", "all")))
    assert acfg["use_rslora"] == kw.get("use_rslora", False)
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(str(d / "adapter_model.safetensors"))}
    assert layers == set(kw.get("layers_to_transform", range(3)))

    ref = merged_logits(tiny, d, IDS)
    got = peft_logits(tiny_model, d, IDS)
    assert_close(got, ref, msg=str(kw))
    with torch.no_grad():
        base = tiny_model(IDS).logits
    assert (got - base).abs().max() > 1e-3  # the adapter does something


def test_delta_norm_is_strength_times_weight_norm(tiny, tiny_model, tmp_path):
    from safetensors.torch import load_file as lf

    w = lf(str(tiny / "model.safetensors"))
    for strength in (0.1, 0.37):
        d = make_random_adapter(tiny_model, tmp_path / f"s{strength}", rank=4,
                                rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 1.0}, use_rslora=True,
                                strength=strength, seed=1)
        deltas = lora_deltas(d)
        assert len(deltas) == 3 * 7
        for name, delta in deltas.items():
            ratio = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w[name].double())
            assert ratio.item() == pytest.approx(strength, rel=1e-5), name


def test_determinism_and_module_independent_seeding(tiny_model, tmp_path):
    a = load_file(str(make_random_adapter(tiny_model, tmp_path / "a", rank=4, seed=3) / "adapter_model.safetensors"))
    b = load_file(str(make_random_adapter(tiny_model, tmp_path / "b", rank=4, seed=3) / "adapter_model.safetensors"))
    c = load_file(str(make_random_adapter(tiny_model, tmp_path / "c", rank=4, seed=4) / "adapter_model.safetensors"))
    qv = load_file(str(make_random_adapter(tiny_model, tmp_path / "qv", rank=4, seed=3, target_modules="q,v")
                       / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert qv and all(torch.equal(qv[k], a[k]) for k in qv)  # a module's weights depend on (seed, name) only


def test_base_model_is_left_unchanged(tiny_model, tmp_path):
    from peft.tuners.lora import LoraLayer

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    make_random_adapter(tiny_model, tmp_path / "a", rank=2)
    assert not any(isinstance(m, LoraLayer) for m in tiny_model.modules())
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(tiny_model, "peft_config")


def test_zero_strength_and_bad_arguments(tiny, tiny_model, tmp_path):
    d = make_random_adapter(tiny, tmp_path / "zero", rank=2, strength=0.0)  # base given as a directory
    assert all((t == 0).all() for t in load_file(str(d / "adapter_model.safetensors")).values())
    with pytest.raises(ValueError, match="rank must be positive"):
        make_random_adapter(tiny_model, tmp_path / "x", rank=0)
    with pytest.raises(ValueError, match="unknown target module 'foo'"):
        make_random_adapter(tiny_model, tmp_path / "x", target_modules="q,foo")
    with pytest.raises(ValueError, match="strength"):
        make_random_adapter(tiny_model, tmp_path / "x", strength=-1.0)
    with pytest.raises(FileExistsError):
        make_random_adapter(tiny_model, d, rank=2)
    make_random_adapter(tiny_model, d, rank=2, overwrite=True)
    assert not (tmp_path / "x").exists()


def test_parsers():
    assert demo_adapters.parse_targets("all") == list(demo_adapters.ALL_TARGETS)
    assert demo_adapters.parse_targets("v,q") == ["q_proj", "v_proj"]
    assert demo_adapters.parse_targets("qkv,down_proj") == ["q_proj", "k_proj", "v_proj", "down_proj"]
    assert demo_adapters.parse_targets(["o_proj", "mlp"]) == ["o_proj", "gate_proj", "up_proj", "down_proj"]
    assert demo_adapters.parse_ranks("8, 16,64") == [8, 16, 64]
    for bad in ("", "8,x", "0", "-4"):
        with pytest.raises(ValueError):
            demo_adapters.parse_ranks(bad)
    with pytest.raises(ValueError):
        demo_adapters.parse_targets(" , ")
    assert demo_adapters.alpha_for(8, "double") == (16.0, False)
    assert demo_adapters.alpha_for(8, "rank") == (8.0, False)
    assert demo_adapters.alpha_for(8, "const", 32) == (32.0, False)
    assert demo_adapters.alpha_for(8, "rslora", 32) == (32.0, True)
    with pytest.raises(ValueError, match="alpha mode"):
        demo_adapters.alpha_for(8, "half")


# ------------------------------------------------------------------------------------------
# make_demo_adapters / the CLI


def test_demo_set_names_manifest_and_idempotence(tiny, tmp_path):
    out = tmp_path / "adapters"
    logs: list[str] = []
    res = make_demo_adapters(tiny, out, ranks=[2, 4], count=3, targets="attn", seed=5, log=logs.append)
    assert [e["name"] for e in res] == ["demo-r2-0", "demo-r4-1", "demo-r2-2"]
    assert [e["rank"] for e in res] == [2, 4, 2] and all(e["made"] for e in res)
    man = json.loads((out / "manifest.json").read_text())
    assert [a["name"] for a in man["adapters"]] == [e["name"] for e in res]
    for a, e in zip(man["adapters"], res):
        assert (out / a["path"]).resolve() == Path(e["path"]).resolve()
        assert a["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert a["lora_alpha"] == 2 * a["rank"] and a["scaling"] == 2.0
        acfg = json.loads((out / a["path"] / "adapter_config.json").read_text())
        assert acfg["r"] == a["rank"] and acfg["lora_alpha"] == a["lora_alpha"]
        assert (out / a["path"] / "adapter_model.safetensors").stat().st_size == a["size_bytes"] - sum(
            p.stat().st_size for p in (out / a["path"]).iterdir() if p.name != "adapter_model.safetensors")
    assert len({e["seed"] for e in res}) == 3
    assert any("[3/3] demo-r2-2: rank 2" in line for line in logs), logs

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")}
    t0 = time.perf_counter()
    logs.clear()
    again = make_demo_adapters(tiny, out, ranks=[2, 4], count=3, targets="attn", seed=5, log=logs.append)
    assert time.perf_counter() - t0 < 2.0
    assert not any(e["made"] for e in again) and all("skipped" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("adapter_model.safetensors")} == mtimes

    # A damaged adapter is remade; only it. Growing the count keeps the others.
    with open(out / "demo-r4-1" / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(100)
    res2 = make_demo_adapters(tiny, out, ranks=[2, 4], count=4, targets="attn", seed=5, log=logs.append)
    assert [e["made"] for e in res2] == [False, True, False, True]
    first = load_file(str(out / "demo-r4-1" / "adapter_model.safetensors"))
    # Changed settings (strength) remake everything; force too.
    res3 = make_demo_adapters(tiny, out, ranks=[2, 4], count=4, targets="attn", seed=5, strength=0.2, log=logs.append)
    assert all(e["made"] for e in res3)
    assert not torch.equal(next(iter(first.values())),
                           load_file(str(out / "demo-r4-1" / "adapter_model.safetensors"))[next(iter(first))])
    res4 = make_demo_adapters(tiny, out, ranks=[2, 4], count=4, targets="attn", seed=5, strength=0.2, force=True,
                              log=logs.append)
    assert all(e["made"] for e in res4)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [demo_adapters.LOCK_NAME]


@pytest.mark.parametrize("mode, alpha, expected", [
    ("double", 16.0, lambda r: (2.0 * r, 2.0, False)),
    ("rank", 16.0, lambda r: (float(r), 1.0, False)),
    ("const", 8.0, lambda r: (8.0, 8.0 / r, False)),
    ("rslora", 8.0, lambda r: (8.0, 8.0 / math.sqrt(r), True)),
])
def test_alpha_modes(tiny, tmp_path, mode, alpha, expected):
    res = make_demo_adapters(tiny, tmp_path, ranks=[2, 8], count=2, targets="q", alpha_mode=mode, alpha=alpha,
                             log=lambda m: None)
    for e in res:
        la, s, rs = expected(e["rank"])
        assert (e["lora_alpha"], e["use_rslora"]) == (la, rs) and e["scaling"] == pytest.approx(s)
        acfg = json.loads((Path(e["path"]) / "adapter_config.json").read_text())
        assert acfg["lora_alpha"] == la and acfg["use_rslora"] == rs
        for name, delta in lora_deltas(Path(e["path"])).items():  # normalised whatever the scaling
            w = load_file(str(tiny / "model.safetensors"))[name].double()
            assert (torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w)).item() == pytest.approx(0.1, rel=1e-5)


def test_cli(tiny, tmp_path):
    out = tmp_path / "ad"
    r = _run([MAKE, "--model-dir", tiny, "--out", out, "--ranks", "2,4", "--count", "2", "--targets", "q,v"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out.absolute())
    assert "[2/2] demo-r4-1" in r.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert [(a["name"], a["rank"], a["targets"]) for a in man["adapters"]] == [
        ("demo-r2-0", 2, ["q_proj", "v_proj"]), ("demo-r4-1", 4, ["q_proj", "v_proj"])]
    r = _run([MAKE, "--model-dir", tiny, "--out", out, "--ranks", "2,4", "--count", "2", "--targets", "q,v"])
    assert r.returncode == 0 and r.stderr.count("skipped") == 2
    for bad, msg in ((["--ranks", "8,x"], "ranks"), (["--targets", "q,bogus"], "bogus"), (["--count", "0"], "count"),
                     (["--alpha-mode", "half"], "invalid choice")):
        r = _run([MAKE, "--model-dir", tiny, "--out", tmp_path / "never", *bad], timeout=60)
        assert r.returncode == 2 and msg in r.stderr, (bad, r.stderr)
    r = _run([MAKE, "--model-dir", tmp_path / "missing", "--out", tmp_path / "never"], timeout=120)
    assert r.returncode == 1 and "not a directory" in r.stderr
    assert not (tmp_path / "never").exists()
    assert "--alpha-mode" in _run([MAKE, "--help"], timeout=60).stdout


# ------------------------------------------------------------------------------------------
# On the real default model: the demo adapters change greedy output visibly


def test_demo_adapter_changes_default_model_output(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = fixtures.default_model_dir()
    res = make_demo_adapters(model_dir, tmp_path, ranks=[8], count=1, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        plain = base.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        pm = PeftModel.from_pretrained(base, res[0]["path"])
        adapted = pm.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert plain.tolist() != adapted.tolist()
    text = tok.decode(adapted, skip_special_tokens=True)
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.7 * len(text), text  # still words
