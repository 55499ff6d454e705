"""The `viper:` section of a model archive's model-config.yaml, validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from viper_lightning import ConfigurationError
from viper_lightning.transport._protocol import DEFAULT_ENDPOINT

__all__ = ["ViperSettings"]

_KNOWN = {"model_name", "endpoint", "pfs_root", "hmac_key", "hmac_key_file", "routes", "model_class",
          "model_kwargs", "initial_weights", "fetch_timeout", "zero_copy", "allow_keyless", "together", "endpoints", "input_dtype", "members"}
INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class ViperSettings:
    """Everything the handler needs to build the model and follow its updates."""

    model_name: str
    model_class: str
    endpoint: str = DEFAULT_ENDPOINT
    pfs_root: str | None = None
    hmac_key: str | None = field(default=None, repr=False)  # never in a log
    hmac_key_file: str | None = None
    routes: tuple[str, ...] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    initial_weights: str | None = "model.safetensors"
    fetch_timeout: float = 10.0
    zero_copy: bool = True
    allow_keyless: bool = False  # the explicit opt-out of authentication (see ModelSubscriber)
    together: bool = False  # switch to each version with the other replicas (see ModelSubscriber)
    # a sharded producer: each part's notice endpoint, part 0 first (ShardedPublisher.endpoints);
    # the worker then follows it with a ShardedSubscriber, and `endpoint` is not used
    endpoints: tuple[str, ...] | None = None
    input_dtype: str = "float32"  # what the default preprocess reads JSON inputs as (int64: token ids)
    # an ensemble: each member's published name and notice endpoint ({"model_name", "endpoint"});
    # the worker builds the model once per member and answers with the mean of their outputs
    members: tuple[tuple[str, str], ...] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> ViperSettings:
        section = (config or {}).get("viper")
        if not isinstance(section, dict):
            raise ConfigurationError("model-config.yaml has no 'viper:' section; build the archive with "
                                     "`python -m serving_handlers.archive` or add one (model_name, model_class)")
        unknown = sorted(set(section) - _KNOWN)
        if unknown:
            raise ConfigurationError(f"unknown keys in the viper: section: {unknown}; known: {sorted(_KNOWN)}")
        for required in ("model_name", "model_class"):
            if not isinstance(section.get(required), str):
                raise ConfigurationError(f"viper.{required} must be a string in model-config.yaml")
        values = dict(section)
        if values.get("routes") is not None:
            values["routes"] = tuple(values["routes"])
        if values.get("endpoints") is not None:
            if not isinstance(values["endpoints"], list) or not values["endpoints"] \
                    or not all(isinstance(e, str) for e in values["endpoints"]):
                raise ConfigurationError("viper.endpoints must list each part's notice endpoint (strings), part 0 "
                                         "first, as ShardedPublisher.endpoints gives them")
            if values.get("together"):
                raise ConfigurationError("viper.together is not available for a sharded producer (viper.endpoints); "
                                         "its parts are announced by several publishers, none of which switches "
                                         "replicas together")
            values["endpoints"] = tuple(values["endpoints"])
        for flag in ("allow_keyless", "together"):
            if not isinstance(values.get(flag, False), bool):
                raise ConfigurationError(f"viper.{flag} must be true or false (unquoted) in model-config.yaml")
        if values.get("members") is not None:
            members = values["members"]
            if not isinstance(members, list) or not members or not all(
                    isinstance(m, dict) and isinstance(m.get("model_name"), str) and isinstance(m.get("endpoint"), str)
                    for m in members):
                raise ConfigurationError("viper.members must list each member as {model_name: ..., endpoint: ...}")
            if values.get("endpoints") or values.get("together"):
                raise ConfigurationError("viper.members (an ensemble) cannot be combined with endpoints or together")
            values["members"] = tuple((m["model_name"], m["endpoint"]) for m in members)
        if values.get("input_dtype", "float32") not in INPUT_DTYPES:
            raise ConfigurationError(f"viper.input_dtype {values.get('input_dtype')!r} is not one of {INPUT_DTYPES}")
        if not isinstance(values.get("model_kwargs", {}), dict):
            raise ConfigurationError("viper.model_kwargs must be a mapping of constructor arguments")
        return cls(**values)

    def key(self) -> bytes | str | None:
        if self.hmac_key_file is not None:
            with open(self.hmac_key_file, "rb") as handle:
                return handle.read().strip()
        return self.hmac_key
