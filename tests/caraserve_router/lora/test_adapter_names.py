"""Adapter names and the checks made before an adapter directory is read (pure, no engine)."""
from __future__ import annotations

import json
import os

import pytest

from caraserve_router.lora.adapter_names import AdapterNames, check_config_types, preflight, scrub
from caraserve_router.lora.adapter_store import AdapterError


def test_aliases_share_a_key_until_the_last_name_goes():
    names = AdapterNames()
    names.bind("a", "a", "/d1")
    assert names.key_for_dir("/d1") == "a"
    names.bind("b", "a", "/d1")
    assert names.names_of("a") == ["a", "b"] and names.id("a") != names.id("b")
    assert names.unbind("a") == ("a", False)
    assert names.key_for_dir("/d1") == "a" and "a" not in names
    # a new adapter may take the name "a" while the old copy still lives under key "a"
    assert names.new_key("a", taken=lambda k: k == "a") == "a:2"
    assert names.unbind("b") == ("a", True)
    assert names.key_for_dir("/d1") is None
    with pytest.raises(AdapterError) as e:
        names.key("b")
    assert e.value.status == 404


def test_preflight_refuses_relative_missing_and_non_adapter_paths_alike(tmp_path):
    with pytest.raises(AdapterError, match="absolute"):
        preflight("x", "rel/dir")
    messages = []
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(AdapterError) as e:
            preflight("x", str(path))
        messages.append(str(e.value))
    assert messages[0] == messages[1] and str(tmp_path) not in messages[0]


def test_preflight_resolves_links(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    os.symlink(tmp_path / "d", tmp_path / "l")
    assert preflight("x", str(tmp_path / "l")) == os.path.realpath(tmp_path / "d")


@pytest.mark.parametrize("config,field", [({"r": 4, "target_modules": [1, 2]}, "target_modules"),
                                          ({"r": 4, "lora_alpha": "x"}, "lora_alpha"),
                                          ({"r": 4, "lora_alpha": True}, "lora_alpha"),
                                          ({"r": "4"}, "'r'"), ({}, "'r'"),
                                          ({"r": 4, "alpha_pattern": {"q": "1"}}, "alpha_pattern"),
                                          ({"r": 4, "rank_pattern": [4]}, "rank_pattern"),
                                          ({"r": 4, "use_rslora": 1}, "use_rslora"),
                                          ({"r": 4, "bias": 0}, "bias")])
def test_config_types(config, field):
    with pytest.raises(AdapterError, match=field) as e:
        check_config_types("x", config)
    assert e.value.status == 400


def test_good_configs_pass():
    check_config_types("x", {"r": 8, "lora_alpha": 16, "target_modules": "q_proj|v_proj",
                             "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 2.5}, "use_rslora": False,
                             "bias": "none", "peft_type": "LORA"})


def test_scrub_replaces_server_paths():
    err = scrub(AdapterError("/srv/a/b: missing tensors; path '/srv/a/b' bad", 400), "n", ("/srv/a/b",))
    assert "/srv" not in str(err) and "'n'" in str(err) and err.status == 400
