"""Settings checked in one place: PublisherSettings (ModelPublisher and ViperCallback build it)
and the TorchServe archive's `viper:` section (ViperSettings.from_config)."""

from __future__ import annotations

import pytest

from serving_handlers import ViperSettings
from viper_lightning import ConfigurationError, ModelPublisher, ViperCallback

from .conftest import LOOPBACK_ANY_PORT

BAD_PUBLISHER_SETTINGS = [
    ({"dram_versions": -1}, "dram_versions=-1"),
    ({"dram_versions": 0}, "no tier would hold the published bytes"),
    ({"dram_bytes": 0}, "dram_bytes=0"),
    ({"dram_bytes": True}, "dram_bytes=True"),
    ({"keep_versions": 0}, "keep_versions=0"),
    ({"heartbeat_interval": 0}, "heartbeat_interval=0"),
    ({"heartbeat_interval": float("nan")}, "heartbeat_interval=nan"),
    ({"gpu_device": "tpu"}, "gpu_device='tpu'"),
    ({"collective_endpoint": "tcp://127.0.0.1:1"}, "collective address"),
    ({"fetch_endpoint": "http://127.0.0.1:1"}, "http://127.0.0.1:1"),
    ({"background_niceness": 20}, "background_niceness=20"),
    ({"background_niceness": -1}, "background_niceness=-1"),
    ({"background_niceness": "19"}, "background_niceness='19'"),
    ({"together": "true"}, "together='true'"),
    ({"together_quorum": 0}, "together_quorum=0"),
    ({"together_deadline": 0}, "together_deadline=0"),
]


@pytest.mark.parametrize("settings, message", BAD_PUBLISHER_SETTINGS)
def test_publisher_and_callback_refuse_the_same_settings_alike(model_name, settings, message) -> None:
    with pytest.raises(ConfigurationError, match=message) as from_publisher:
        ModelPublisher(model_name, LOOPBACK_ANY_PORT, **settings)
    with pytest.raises(ConfigurationError, match=message) as from_callback:
        ViperCallback(model_name, LOOPBACK_ANY_PORT, **settings)
    assert str(from_publisher.value) == str(from_callback.value)


def test_publisher_settings_are_kept_as_checked(model_name) -> None:
    callback = ViperCallback(model_name, LOOPBACK_ANY_PORT, hmac_key="k" * 16, keep_versions=2, gpu_device="auto")
    assert callback.settings.hmac_key == b"k" * 16  # normalised once
    assert callback.settings.gpu_device is None  # "auto" is resolved against the module at train start
    assert (callback.settings.keep_versions, callback.model_name) == (2, model_name)


def test_viper_section_is_read_with_its_defaults() -> None:
    settings = ViperSettings.from_config({"viper": {"model_name": "nt3", "model_class": "NT3",
                                                    "routes": ["dram-shm", "pfs"]}})
    assert settings.routes == ("dram-shm", "pfs") and settings.model_kwargs == {}
    assert settings.initial_weights == "model.safetensors" and settings.key() is None


def test_viper_section_key_file_is_read(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"a key of sixteen bytes\n")
    settings = ViperSettings.from_config({"viper": {"model_name": "m", "model_class": "M",
                                                    "hmac_key_file": str(key_file)}})
    assert settings.key() == b"a key of sixteen bytes"


@pytest.mark.parametrize("config, message", [
    (None, "no 'viper:' section"),
    ({"viper": ["model_name"]}, "no 'viper:' section"),
    ({"viper": {"model_name": "m", "model_class": "M", "colour": "red"}}, r"unknown keys .*\['colour'\]"),
    ({"viper": {"model_class": "M"}}, "viper.model_name must be a string"),
    ({"viper": {"model_name": "m", "model_class": 3}}, "viper.model_class must be a string"),
    ({"viper": {"model_name": "m", "model_class": "M", "model_kwargs": [1]}}, "model_kwargs must be a mapping"),
    ({"viper": {"model_name": "m", "model_class": "M", "together": "yes"}}, "viper.together must be true or false"),
])
def test_viper_section_errors_name_the_key_and_the_fix(config, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ViperSettings.from_config(config)


def test_the_key_never_shows_in_a_repr(model_name) -> None:
    callback = ViperCallback(model_name, LOOPBACK_ANY_PORT, hmac_key="a secret key, 16+ bytes")
    assert "secret" not in repr(callback.settings)


def test_settings_are_normalised_once(model_name) -> None:
    import numpy
    import torch

    callback = ViperCallback(model_name, LOOPBACK_ANY_PORT, gpu_device=torch.device("cpu"),
                             keep_versions=numpy.int64(2))
    assert callback.settings.gpu_device == "cpu" and callback.settings.keep_versions == 2


def test_the_archive_key_never_shows_in_a_repr() -> None:
    settings = ViperSettings.from_config({"viper": {"model_name": "m", "model_class": "M",
                                                    "hmac_key": "a secret key, 16+ bytes"}})
    assert "secret" not in repr(settings) and settings.key() == "a secret key, 16+ bytes"
