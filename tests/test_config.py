"""EF21Config: the one place where options are checked (every entry point builds one)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from ef_lightning.config import DEFAULT_DOWNLINK, DEFAULT_UPLINK, EF21Config, EF21ConfigError


def test_defaults_are_the_documented_constants():
    c = EF21Config()
    assert (c.uplink, c.downlink, c.topology) == (dict(DEFAULT_UPLINK), dict(DEFAULT_DOWNLINK), "sharded")
    assert EF21Config(topology="allgather").downlink == "identity"  # allgather has no downlink


def test_replace_resolves_defaults_again_and_keeps_explicit_values():
    assert EF21Config().replace(topology="allgather").downlink == "identity"
    assert EF21Config(topology="allgather").replace(topology="server").downlink == dict(DEFAULT_DOWNLINK)
    assert EF21Config(downlink="top_k:0.2").replace(seed=3).downlink == "top_k:0.2"
    with pytest.raises(ValueError, match="downlink='top_k:0.2' needs topology"):
        EF21Config(downlink="top_k:0.2").replace(topology="allgather")


def test_frozen_all_the_way_down_and_still_plain_data():
    c = EF21Config(uplink={"hidden": "top_k:0.1", "default": "identity"})
    with pytest.raises(TypeError, match="read-only"):
        c.uplink["hidden"] = "top_k:0.9"  # type: ignore[index]
    with pytest.raises(AttributeError):
        c.seed = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c and hash(c) == hash(EF21Config(**c.to_dict()))
    assert json.loads(json.dumps(c.to_dict()))["uplink"] == {"hidden": "top_k:0.1", "default": "identity"}


@pytest.mark.parametrize("options, fields, text", [
    ({"topology": "ring"}, ("topology",), "valid choices: sharded, allgather, server"),
    ({"uplink": "topk:0.1"}, ("uplink",), "valid names"),
    ({"uplink": {"hiden": "top_k:0.1"}}, ("uplink",), "valid roles: hidden, conv, embedding, head, vector, default"),
    ({"seed": -1}, ("seed",), "integers >= 0"),
    ({"estimator": "mvr", "p": 0.5}, ("p", "estimator"), "valid choices with p: marina, ef21_page"),
    ({"participation": 0.5}, ("participation", "topology"), "needs topology 'server'"),
    ({"estimator": "marina", "uplink": "top_k:0.1"}, ("uplink", "estimator"), "contractive"),
])
def test_errors_name_the_option_the_value_and_the_valid_choices(options, fields, text):
    with pytest.raises(EF21ConfigError) as e:
        EF21Config(**options)
    assert e.value.fields == fields and text in str(e.value)


def test_build_rejects_unknown_options_and_accumulation_rule():
    with pytest.raises(TypeError, match="valid options: uplink, downlink, topology"):
        EF21Config.build(uplnk="top_k:0.1")
    EF21Config(estimator="ef21").check_accumulation(4, "accumulate_grad_batches")  # fine without VR
    with pytest.raises(ValueError, match="estimator='mvr' with accumulate_grad_batches=2.*valid choices"):
        EF21Config(estimator="mvr", uplink="top_k:0.2").check_accumulation(2, "accumulate_grad_batches")
