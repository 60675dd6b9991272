"""The recommended child as a Hydra preset (``conf/experiment/<name>.yaml``), checked by composing it."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diaropt.config import CONF_DIR
from diaropt.keys import TAG_OVERRIDES, overrides_from_tag
from diaropt.report.load import is_config_key, present
from diaropt.tracking import flatten_config

#: Logged params that do not come from a preset (where results go, content hashes, resolved values).
_PARAM_NOISE = ("tracking.", "paths.", "weights_sha256.", "dataset.uris", "backend.resolved", "experiment_preset")


def preset_name(parent_run_id: str) -> str:
    return f"recommended_{parent_run_id[:8]}"


def _config_groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()} if CONF_DIR.is_dir() else set()


def preset_yaml(row: Mapping[str, Any], name: str, comment: str = "") -> str:
    """A ``conf/experiment/<name>.yaml`` preset of a child's configuration overrides.

    Group overrides become ``override /group: option`` defaults (``experiment=X`` includes preset X
    first); other keys become plain (nested) keys. ``tracking.*``, ``paths.*`` and ``hydra.*`` are
    left out: they say where results go, not what runs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    groups = _config_groups()
    text = row.get(f"tags.{TAG_OVERRIDES}")
    items = [o for o in overrides_from_tag(text) if is_config_key(o.lstrip("+~"))]
    parsed = OverridesParser.create().parse_overrides(items)
    included: list[str] = []
    overrides: list[str] = []
    scalars = OmegaConf.create({})
    skipped: list[str] = []
    for item, override in zip(items, parsed):
        key = override.key_or_group
        if override.is_delete() or override.is_sweep_override() or (key in groups and override.package):
            skipped.append(item)
        elif key == "experiment":
            value = override.value()
            if value is not None:
                included.append(str(value))
        elif key in groups:
            value = override.value()
            overrides.append(f"override /{key}: {'null' if value is None else value!s}")
        else:
            OmegaConf.update(scalars, key, override.value(), force_add=True)
    lines = ["# @package _global_"]
    lines += [f"# {line}".rstrip() for line in comment.splitlines()]
    if skipped:
        lines.append(f"# not representable in a preset, left out: {' '.join(skipped)}")
    lines.append("defaults:")
    lines += [f"  - {entry}" for entry in included + overrides]
    lines.append("  - _self_")
    body = {**OmegaConf.to_container(scalars), "experiment_preset": name}
    lines.append(OmegaConf.to_yaml(OmegaConf.create(body)).rstrip())
    return "\n".join(lines) + "\n"


def compare_preset(preset_file: Path, row: Mapping[str, Any]) -> tuple[int, list[str]]:
    """Compose ``experiment=<preset>`` (the preset's folder on Hydra's search path) and compare it
    with the child's logged params; returns (keys compared, mismatches as "key: logged != preset").

    Raises if the preset does not compose.
    """
    from diaropt.config import compose, to_container

    preset_file = Path(preset_file).resolve()
    if preset_file.parent.name != "experiment":
        raise ValueError(f"{preset_file} must be in a folder named experiment/")
    cfg = compose([f"hydra.searchpath=[file://{preset_file.parent.parent}]", f"experiment={preset_file.stem}"])
    composed = flatten_config(to_container(cfg))
    logged = {k.removeprefix("params."): v for k, v in row.items() if k.startswith("params.") and present(v)}
    keys = sorted(k for k in set(composed) & set(logged) if not k.startswith(_PARAM_NOISE))
    mismatches = [f"{k}: logged {logged[k]!r} != preset {composed[k]!r}" for k in keys
                  if str(logged[k]) != str(composed[k])]
    return len(keys), mismatches


def preset_check(preset_file: Path, row: Mapping[str, Any], name: str) -> str:
    """One sentence for the report: does the preset compose to the run's logged configuration?"""
    try:
        compared, mismatches = compare_preset(preset_file, row)
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        return f"Preset check FAILED: the preset does not compose: `{type(error).__name__}: {error}`"
    if not mismatches:
        return (f"Preset check: `experiment={name}` composes to the recommended run's logged configuration "
                f"({compared} keys compared).")
    return ("Preset check: composes, but differs from the logged params (the configuration schema may have "
            "changed since the sweep): " + "; ".join(f"`{m}`" for m in mismatches[:10]))


def install_preset(preset_file: Path, conf_dir: Path = CONF_DIR) -> Path:
    """Copy a preset to ``conf/experiment/`` so ``experiment=<name>`` finds it; returns the target."""
    target = Path(conf_dir) / "experiment" / Path(preset_file).name
    from diaropt.files import atomic_path

    with atomic_path(target) as tmp:  # a failed copy leaves no partial preset for Hydra to compose
        shutil.copyfile(preset_file, tmp)
    return target
