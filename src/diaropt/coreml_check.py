"""Check a configuration's Core ML models on a Mac: ``python -m diaropt.coreml_check [overrides]``.

Steps, per model of the configuration (``backend=coreml`` forced):

1. build the packages (``variants.build.build_models``; any OS);
2. run the evaluation clip (the first 10 s of the dataset's first file) through the project's
   ML-program executor (``backends.coreml_program``; any OS);
3. under every compute unit: compile (``compile_model``) and load, report where each op runs
   (``MLComputePlan``, macOS 14.4+), predict the clip and compare with the executor (max abs
   difference, cosine), timing compile, load and prediction (macOS only).

Off macOS steps 1-2 run and every step of 3 is reported as needing macOS. Exit codes: 0 checked;
2 a bad override (one that does not compose, or another backend) or a configuration this check cannot
feed model by model (``segmentation.sinc_shared=true``); 3 one that cannot be built (on this host, or
a combination no backend expresses); 1 the report (printed) could not be written to ``--out``. All Apple calls go
through ``AppleRuntime`` (the single boundary the tests mock).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from diaropt.backends.base import BackendUnavailable, is_macos

COMPUTE_UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")
NEEDS_MACOS = "needs macOS (Apple's Core ML framework)"


class UncheckableConfiguration(ValueError):
    """A configuration whose models this check cannot feed one by one (said before any work)."""


class BadOverride(ValueError):
    """An override that does not compose (Hydra's or the schema's reason, one line), or one that
    selects another backend than the ``backend=coreml`` this check forces (said before any work)."""


class AppleRuntime:
    """Apple's Core ML calls (macOS): compile, load with a compute unit, op placement, predict."""

    def __init__(self) -> None:
        if not is_macos():
            raise BackendUnavailable(f"compile, load, MLComputePlan and prediction {NEEDS_MACOS}")
        import coremltools as ct

        self.ct = ct

    def compile(self, path: Path) -> str:
        return self.ct.models.utils.compile_model(str(path))

    def load(self, compiled: str, compute_unit: str):
        from diaropt.backends.coreml import COMPUTE_UNITS as UNITS

        return self.ct.models.CompiledMLModel(compiled, getattr(self.ct.ComputeUnit, UNITS[compute_unit]))

    def op_placement(self, compiled: str, compute_unit: str) -> dict[str, int] | str:
        """{device: op count} from ``MLComputePlan`` (macOS 14.4+), else why it is unavailable."""
        from diaropt.backends.coreml import COMPUTE_UNITS as UNITS

        try:
            from coremltools.models.compute_plan import MLComputePlan
        except ImportError as error:
            return f"MLComputePlan unavailable ({error})"
        try:
            plan = MLComputePlan.load_from_path(compiled, getattr(self.ct.ComputeUnit, UNITS[compute_unit]))
        except Exception as error:  # noqa: BLE001 - older macOS: say so, go on
            return f"MLComputePlan unavailable (needs macOS 14.4+): {error}"
        counts: dict[str, int] = {}
        program = plan.model_structure.program
        for function in program.functions.values():
            for operation in function.block.operations:
                usage = plan.get_compute_device_usage_for_mlprogram_operation(operation)
                device = type(usage.preferred_compute_device).__name__ if usage is not None else "none"
                counts[device] = counts.get(device, 0) + 1
        return counts

    def predict(self, model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in model.predict(feeds).items()}


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Max abs difference and cosine similarity over the finite elements of both (float64)."""
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    finite = np.isfinite(got) & np.isfinite(want)
    a, b = got[finite], want[finite]
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return {"max_abs": float(np.abs(a - b).max()) if a.size else float("nan"),
            "cosine": float(a @ b / norm) if norm > 0 else float("nan"),
            "nonfinite_mismatch": int((np.isfinite(got) != np.isfinite(want)).sum())}


def clip_feeds(inputs, clip: np.ndarray, earlier: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs of one model: waveforms from the clip (every row), earlier models' outputs by name,
    masks all ones (every frame active)."""
    feeds = {}
    for spec in inputs:
        if spec.name in earlier and earlier[spec.name].shape == tuple(spec.shape):
            feeds[spec.name] = earlier[spec.name]
        elif spec.name == "waveforms":
            feeds[spec.name] = np.broadcast_to(clip[: spec.shape[-1]], spec.shape).astype(np.float32).copy()
        elif spec.name == "masks":
            feeds[spec.name] = np.ones(spec.shape, np.float32)
        else:
            raise ValueError(f"no clip input for {spec.name!r} {spec.shape}: no earlier model produces it")
    return feeds


def check(overrides: list[str], compute_units: tuple[str, ...] = COMPUTE_UNITS,
          runtime_factory=AppleRuntime) -> dict[str, Any]:
    """Run every step this host can; a JSON-able report (``steps_needing_macos`` lists the rest)."""
    from diaropt.backends.coreml_program import CoreMLProgramModel
    from diaropt.config import OVERRIDE_ERRORS, compose
    from diaropt.pipeline.audio import load_audio
    from diaropt.runner import dataset_from_config
    from diaropt.variants.build import build_models

    other_backend = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in ("backend", "backend.name")
                     and o.split("=", 1)[-1] != "coreml"]
    if other_backend:  # it would be replaced by backend=coreml, and the report would name it
        raise BadOverride(f"{', '.join(other_backend)}: this check builds and checks backend=coreml (drop the "
                          "override; other backends run with python -m diaropt diarize)")
    try:
        cfg = compose([*overrides, "backend=coreml"])
    except OVERRIDE_ERRORS as error:  # config.compose: one line
        raise BadOverride(str(error)) from error
    from diaropt.variants.fusion_plan import resolve_sinc_shared

    if resolve_sinc_shared(cfg, "coreml"):  # before the build: the rest model's input is no clip input
        raise UncheckableConfiguration(
            "segmentation.sinc_shared=true splits segmentation into a sinc front run once per row and a rest "
            "fed the front's rows cut per chunk; this check feeds each model a clip's inputs and does not "
            "assemble them: check it with segmentation.sinc_shared=false (or null, the Core ML default)")
    report: dict[str, Any] = {"overrides": overrides, "host_is_macos": is_macos(), "models": {}}
    start = time.perf_counter()
    built = build_models(cfg)
    report["build_s"] = time.perf_counter() - start
    item = next(iter(dataset_from_config(cfg)))
    clip = load_audio(item.audio_path)[:160000]
    clip = np.pad(clip, (0, max(0, 160000 - clip.shape[0])))
    report["clip"] = f"{item.uri}: first {clip.shape[0] / 16000:g} s"
    try:
        runtime = runtime_factory()
    except BackendUnavailable as error:
        runtime, report["steps_needing_macos"] = None, ["compile", "load", "op placement (MLComputePlan)",
                                                        "prediction", "comparison with the executor"]
        report["macos_reason"] = error.reason
    earlier: dict[str, np.ndarray] = {}
    stages = [m for m in built.stages if m.path is not None] or [m for m in built.models() if m.path is not None]
    for model in stages:
        executor = CoreMLProgramModel(model.path, model.kind)
        feeds = clip_feeds(executor.inputs, clip, earlier)
        start = time.perf_counter()
        reference = executor(**feeds)
        entry: dict[str, Any] = {"path": str(model.path), "executor_s": time.perf_counter() - start,
                                 "executor_stats": dict(executor.stats.counts),
                                 "executor_first_nonfinite_op": executor.stats.first_nonfinite_op, "units": {}}
        earlier.update(reference)
        if runtime is not None:
            for unit in compute_units:
                row: dict[str, Any] = {}
                start = time.perf_counter()
                compiled = runtime.compile(model.path)
                row["compile_s"] = time.perf_counter() - start
                start = time.perf_counter()
                loaded = runtime.load(compiled, unit)
                row["load_s"] = time.perf_counter() - start
                row["op_placement"] = runtime.op_placement(compiled, unit)
                start = time.perf_counter()
                outputs = runtime.predict(loaded, feeds)
                row["predict_s"] = time.perf_counter() - start
                row["vs_executor"] = {name: compare(outputs[name], reference[name]) for name in reference}
                entry["units"][unit] = row
        report["models"][model.kind] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    from diaropt.quiet import quiet_third_party

    quiet_third_party()  # before coremltools is imported: its off-macOS notices, and bars off a terminal
    parser = argparse.ArgumentParser(prog="python -m diaropt.coreml_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compute-units", default=",".join(COMPUTE_UNITS))
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args, overrides = parser.parse_known_args(argv)
    units = tuple(u for u in args.compute_units.split(",") if u)
    bad = [u for u in units if u not in COMPUTE_UNITS]
    if bad:
        parser.error(f"unknown compute units {bad}; expected some of {COMPUTE_UNITS}")
    try:
        report = check(overrides, units)
    except BackendUnavailable as error:
        print(f"error: this configuration cannot be built: {error.reason}", file=sys.stderr)
        return 3
    except BadOverride as error:
        print(f"error: bad configuration override: {error}", file=sys.stderr)
        return 2
    except UncheckableConfiguration as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        from diaropt.files import atomic_path

        try:
            with atomic_path(args.out) as tmp:
                tmp.write_text(text)
        except OSError as error:  # the report is on stdout: say why the file is not, in one line
            print(f"error: could not write {args.out}: {error}", file=sys.stderr)
            return 1
    if not report["host_is_macos"]:
        print(f"ran: build, executor. Not run here ({report['macos_reason']}): "
              f"{', '.join(report['steps_needing_macos'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
