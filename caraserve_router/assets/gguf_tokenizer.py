"""Rebuild the HF tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) from the tokenizer a GGUF file carries in its metadata.

Only GPT-2 byte-level BPE tokenizers (llama.cpp's "gpt2" model, "smollm" / "gpt-2"
pre-tokenizers) are supported; `tokenizers` is imported inside the function.
"""
from __future__ import annotations

from pathlib import Path

from caraserve_router.assets.errors import ModelPrepError
from caraserve_router.assets.file_ops import write_json
from caraserve_router.assets.gguf_reader import gguf_field


def build_tokenizer_files(reader, out_dir: Path, model_max_length: int) -> dict:
    """Rebuild the GGUF's GPT-2 byte-level BPE tokenizer as HF tokenizer files.

    llama.cpp's "smollm" pre-tokenizer splits every digit on its own, then applies the GPT-2
    regex; the HF original does the same with `Digits(individual_digits=True)` + `ByteLevel`.
    Tokens llama.cpp marks CONTROL (type 3) become special added tokens. Returns the special
    token facts.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelPrepError(f"only GPT-2 byte-level BPE tokenizers are supported, this GGUF has {kind!r}")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if pre == "smollm":
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        raise ModelPrepError(f"unsupported GGUF pre-tokenizer {pre!r} (known: smollm, gpt-2)")

    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ")) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ModelPrepError("malformed merges in the GGUF tokenizer")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelPrepError("duplicate tokens in the GGUF vocabulary")

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tok
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tok for tok, ty in zip(tokens, types) if int(ty) == 3]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tk.save(str(out_dir / "tokenizer.json"))

    def tok_of(key: str) -> str | None:
        idx = gguf_field(reader, f"tokenizer.ggml.{key}", None)
        return None if idx is None else tokens[int(idx)]

    bos, eos, unk, pad = tok_of("bos_token_id"), tok_of("eos_token_id"), tok_of("unknown_token_id"), tok_of("padding_token_id")
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    specials = {k: v for k, v in specials.items() if v is not None}
    extra = [t for t in control if t not in specials.values()]
    chat_template = gguf_field(reader, "tokenizer.chat_template", None)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        **specials,
        "additional_special_tokens": extra,
    }
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    write_json(out_dir / "tokenizer_config.json", tok_cfg)
    write_json(out_dir / "special_tokens_map.json", {**specials, "additional_special_tokens": extra})

    def idx(key: str) -> int | None:
        v = gguf_field(reader, f"tokenizer.ggml.{key}", None)
        return None if v is None else int(v)

    return {
        "bos_token_id": idx("bos_token_id"),
        "eos_token_id": idx("eos_token_id"),
        "pad_token_id": idx("padding_token_id"),
        "unk_token_id": idx("unknown_token_id"),
        "n_tokens": len(tokens),
    }
