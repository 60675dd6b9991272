"""Values for MLflow: configs flattened to params, plain-JSON conversion, tags as bounded strings."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diaropt.tracking.store import MAX_PARAM_VALUE_CHARS, MAX_TAG_VALUE_CHARS

_TRUNCATION_MARKER = "...[truncated {n} chars]"


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` chars, ending with a ``...[truncated N chars]`` marker if cut."""
    if len(value) <= limit:
        return value
    marker = _TRUNCATION_MARKER.format(n=len(value) - limit)
    marker = _TRUNCATION_MARKER.format(n=len(value) - (limit - len(marker)))
    return value[: limit - len(marker)] + marker


def str_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as strings within MLflow's length limit; None values dropped."""
    return {str(k): truncate(str(v), MAX_TAG_VALUE_CHARS) for k, v in tags.items() if v is not None}


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become null, numpy/Path/sets are converted."""
    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=False, enum_to_str=True)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return to_jsonable(obj.tolist())
    return str(obj)


def config_container(cfg: Mapping | DictConfig) -> Any:
    """Plain containers of a config, interpolations resolved when possible."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra job
            return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    return cfg


def scalar_str(value: Any) -> str:
    """A param value as a string: mappings as JSON, lists joined with ``,``, enums by name."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = config_container(value)
    if isinstance(value, Mapping):
        return json.dumps(to_jsonable(value), sort_keys=True)
    if isinstance(value, (list, tuple)):
        return ",".join(scalar_str(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.name)
    return str(value)


def param_str(value: Any) -> str:
    """A param value as a string within MLflow's 6000-char limit."""
    return truncate(scalar_str(value), MAX_PARAM_VALUE_CHARS)


def flatten_config(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> string values, for MLflow params.

    Interpolations are resolved when possible. A list of scalars is joined with ``,``; a list
    holding mappings is flattened with its indices (``a.0.b``). An empty mapping gives ``{}``.
    Values longer than MLflow's 6000-char limit are truncated with a ``...[truncated N chars]``
    marker.
    """
    flat: dict[str, str] = {}

    def visit(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            if not node and key:
                flat[key] = "{}"
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in node):
            for i, v in enumerate(node):
                visit(v, f"{key}.{i}" if key else str(i))
        else:
            flat[key] = param_str(node)

    visit(config_container(cfg), prefix.rstrip("."))
    return flat


def config_dict(cfg: Mapping | DictConfig) -> Any:
    """The config as plain JSON types (interpolations resolved when possible), for ``log_dict``."""
    return to_jsonable(config_container(cfg))
