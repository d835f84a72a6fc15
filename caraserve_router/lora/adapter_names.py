"""Registered adapter names of one instance, and the checks made before an adapter is read.

- `AdapterNames`: a client-facing name maps to a *storage key* (the AdapterStore / pool /
  sidecar entry). One directory loaded under several names is held once: later names are
  aliases of the first one's key, and the key goes when its last name is removed.
- `preflight`: what is checked before the store reads a directory: the path is absolute
  (a relative one would resolve against the server's working directory), it holds a PEFT
  adapter, and `adapter_config.json` has the types PEFT writes (a `target_modules: [1, 2]` or
  `lora_alpha: "x"` is a 400 naming the field, not a crash deep in the loader).
- `scrub`: error messages name the adapter, never the server-side path, so no message tells
  where the server looked or what exists there.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from caraserve_router.lora.adapter_store import AdapterError

_MISSING = "is not a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)"
_NUMBER = (int, float)


class AdapterNames:
    def __init__(self):
        self._key: dict[str, str] = {}      # name -> storage key
        self._dir_key: dict[str, str] = {}  # real directory -> storage key
        self._key_dir: dict[str, str] = {}
        self._ids: dict[str, int] = {}      # name -> instance-local id (AdapterRequest.id)
        self._next_id = 0

    def __contains__(self, name) -> bool:
        return name in self._key

    def names(self) -> list[str]:
        return list(self._key)

    def key(self, name: str) -> str:
        if name not in self._key:
            raise AdapterError(f"adapter {name!r} is not registered", status=404)
        return self._key[name]

    def id(self, name: str) -> int:
        return self._ids[name]

    def names_of(self, key: str) -> list[str]:
        return [n for n, k in self._key.items() if k == key]

    def key_for_dir(self, real_dir: str) -> Optional[str]:
        return self._dir_key.get(real_dir)

    def new_key(self, name: str, taken) -> str:
        """A storage key for a new directory: the name itself unless a removed name's directory
        still lives under it (kept for its aliases)."""
        key, n = name, 1
        while taken(key):
            n += 1
            key = f"{name[:120]}:{n}"
        return key

    def bind(self, name: str, key: str, real_dir: str) -> None:
        self._next_id += 1
        self._key[name], self._ids[name] = key, self._next_id
        self._dir_key[real_dir], self._key_dir[key] = key, real_dir

    def unbind(self, name: str) -> tuple[str, bool]:
        """Forget `name`; returns (its key, whether that was the key's last name)."""
        key = self._key.pop(name)
        self._ids.pop(name, None)
        last = key not in self._key.values()
        if last:
            self._dir_key.pop(self._key_dir.pop(key), None)
        return key, last


def preflight(name: str, path) -> str:
    """The real directory of `path` once it is known to hold a well-typed PEFT LoRA config."""
    if not isinstance(path, str) or not path:
        raise AdapterError(f"adapter {name!r}: the path must be a non-empty string")
    if not os.path.isabs(path):
        raise AdapterError(f"adapter {name!r}: the path must be absolute")
    real = os.path.realpath(path)
    config_path = os.path.join(real, "adapter_config.json")
    if not (os.path.isdir(real) and os.path.isfile(config_path)):
        raise AdapterError(f"adapter {name!r}: the path {_MISSING}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON ({type(e).__name__})") from None
    check_config_types(name, config)
    return real


def check_config_types(name: str, config) -> None:
    """The types PEFT writes for the fields CaraServe reads (ValueError-compatible 400s)."""
    def bad(field: str, want: str):
        raise AdapterError(f"adapter {name!r}: adapter_config.json field {field!r} must be {want}, "
                           f"got {_short(config.get(field))}")

    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json must hold a JSON object")
    if not _is_int(config.get("r")):
        bad("r", "an integer")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        bad("lora_alpha", "a number")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        bad("target_modules", "a string or a list of strings")
    for field, check, want in (("rank_pattern", _is_int, "an object of integers"),
                               ("alpha_pattern", _is_number, "an object of numbers")):
        value = config.get(field)
        if value is not None and not (isinstance(value, dict) and all(check(v) for v in value.values())):
            bad(field, want)
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            bad(field, "true or false")
    if config.get("bias") is not None and not isinstance(config["bias"], str):
        bad("bias", "a string")
    if config.get("peft_type") is not None and not isinstance(config["peft_type"], str):
        bad("peft_type", "a string")


def scrub(error: AdapterError, name: str, paths: tuple) -> AdapterError:
    """`error` with every server-side path in its message replaced by the adapter's name."""
    message = str(error)
    for p in sorted({p for p in paths if p}, key=len, reverse=True):
        message = message.replace(repr(p), f"of adapter {name!r}").replace(p, f"adapter {name!r}")
    return AdapterError(message, error.status)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
