"""The synthesizer registry: settings classes without torch, implementations imported when built."""

from __future__ import annotations

import pytest

from synthesizers import METHODS, CMIConfig, get_synthesizer, list_synthesizers, method_config_class, register
from synthesizers.cmi import CMI
from synthesizers.deepinversion import DeepInversion


def test_each_method_names_its_settings_and_its_implementation() -> None:
    assert list_synthesizers() == ["cmi", "deepinversion", "fast"]
    assert method_config_class("cmi") is CMIConfig
    assert get_synthesizer("cmi") is CMI and get_synthesizer("deepinversion") is DeepInversion
    assert all(get_synthesizer(name).config_class is entry.config_class for name, entry in METHODS.items())


def test_unknown_method_is_a_value_error_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown synthesizer .gan.: choose one of cmi, deepinversion, fast"):
        method_config_class("gan")


def test_an_implementation_must_match_its_entry_and_register_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(CMI)

    class Impostor(CMI):
        config_class = CMIConfig

    with pytest.raises(ValueError, match="does not match its METHODS entry"):
        register(Impostor)
