"""``python -m diaropt diarize AUDIO... --out DIR [OVERRIDES...]``: one RTTM per file.
``python -m diaropt ui [--port N] [--open] [OVERRIDES...]``: the MLflow UI on the sweeps' runs table.

Overrides are the sweep's (Hydra syntax), e.g. ``quant=int8 backend=torch segmentation.step_s=2``
or ``tracking.tracking_uri=sqlite:////tmp/store/mlflow.db``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from diaropt.quiet import quiet_third_party

log = logging.getLogger("diaropt")


def _uris(paths: list[Path]) -> tuple[list[tuple[Path, str]], list[str], list[str]]:
    """``(path, uri)`` per usable file, per-file refusals, and collisions (two files, one uri).

    The uri is the file's stem as an RTTM uri (:func:`diaropt.data.annotations.rttm_uri`: NFC,
    whitespace replaced); a name that cannot be one is refused with the file named.
    """
    from diaropt.data.annotations import DataError, describe_uri, rttm_uri

    jobs: list[tuple[Path, str]] = []
    refused: list[str] = []
    first: dict[str, Path] = {}
    collisions: list[str] = []
    for path in paths:
        try:
            uri = rttm_uri(path.stem, path)
        except DataError as error:
            refused.append(str(error))
            continue
        if uri != path.stem:
            log.warning("%s: the name %s is written as uri %s (%s.rttm)", path, describe_uri(path.stem),
                        describe_uri(uri), uri)
        if uri in first:
            collisions.append(f"{first[uri]} and {path} would both be written to {uri}.rttm (uri {describe_uri(uri)})")
            continue
        first[uri] = path
        jobs.append((path, uri))
    return jobs, refused, collisions


def _out_folder_problem(out: Path) -> str | None:
    """Why ``out`` cannot be the RTTM folder (it, or its nearest existing parent, is not a folder), or None."""
    for path in (out, *out.absolute().parents):
        if path.exists():
            if path.is_dir():
                return None
            return "is a file, not a folder" if path == out else f"{path} is a file, not a folder"
    return None


def diarize(argv: list[str]) -> int:
    """Exit codes: 0 every file diarized; 1 some file failed (each named, the others written);
    2 bad arguments, configuration, file names or ``--out`` folder (nothing done); 3 the configuration cannot be built
    or loaded on this host (one line: the reason)."""
    parser = argparse.ArgumentParser(prog="python -m diaropt diarize", description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="+", type=Path, help="audio files (wav, flac, ogg, ...)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the RTTM files")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown options {bad}; configuration overrides look like key=value")

    from diaropt.lazy_imports import import_pyannote_core_without_pyplot

    import_pyannote_core_without_pyplot()  # before anything imports pyannote.core: no matplotlib (~0.5 s)
    from diaropt.backends.base import BackendUnavailable
    from diaropt.config import OVERRIDE_ERRORS, compose
    from diaropt.data.annotations import write_rttm
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import ChunkProgress, load_pipeline
    from diaropt.variants.build import build_models

    try:
        cfg = compose(overrides)
    except OVERRIDE_ERRORS as error:  # before any work
        print(f"error: bad configuration override: {error}", file=sys.stderr)
        return 2
    missing = [str(path) for path in args.audio if not path.is_file()]
    if missing:
        print(f"error: no such audio file: {', '.join(missing)}", file=sys.stderr)
        return 2
    out_problem = _out_folder_problem(args.out)
    if out_problem:  # before the models are built
        print(f"error: --out {args.out}: {out_problem}", file=sys.stderr)
        return 2
    jobs, refused, collisions = _uris(args.audio)
    if collisions:  # refused up front: no result may overwrite another
        print("error: two input files would write the same RTTM (rename one): " + "; ".join(collisions),
              file=sys.stderr)
        return 2
    for message in refused:  # per file: the others are diarized
        print(f"error: {message}", file=sys.stderr)
    try:
        built = build_models(cfg)
    except BackendUnavailable as error:
        print(f"error: this configuration cannot be built: {error.reason}", file=sys.stderr)
        return 3
    except Exception as error:  # noqa: BLE001 - unbuildable (no checkpoint, ...): one line, no traceback
        log.debug("build failed", exc_info=True)
        print(f"error: this configuration cannot be built: {type(error).__name__}: {error}", file=sys.stderr)
        return 3
    timer = StageTimer()
    progress = ChunkProgress(enabled=not args.no_progress)
    try:  # a refusal at load: one line, exit 3
        pipeline = load_pipeline(cfg, built, timer, progress, warm_up=False)  # the first file warms up
    except BackendUnavailable as error:
        print(f"error: this configuration cannot run on this host: {error.reason}", file=sys.stderr)
        return 3
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. no permission: nothing diarized yet
        print(f"error: --out {args.out}: cannot create the folder ({error.strerror or error})", file=sys.stderr)
        return 2
    audio_duration_s = 0.0
    failed = [message.split(": ", 1)[0] for message in refused]
    written: list[str] = []
    from tqdm.auto import tqdm

    from diaropt.progress import enabled as progress_enabled

    # tqdm reads TQDM_DISABLE only for arguments not given: decide here, as every other bar does
    for path, uri in tqdm(jobs, desc="files", unit="file", disable=args.no_progress or not progress_enabled()):
        try:
            output = pipeline(path, uri, timer=timer)
            write_rttm(output.annotation, args.out / f"{uri}.rttm", uri=uri)  # atomic: no partial RTTM
        except (ValueError, OSError) as error:  # bad input, full disk: name the file, go on with the others
            print(f"error: {path}: {error}" if str(path) not in str(error) else f"error: {error}", file=sys.stderr)
            failed.append(str(path))
            continue
        audio_duration_s += output.audio_duration_s
        written.append(str(args.out / f"{uri}.rttm"))
    progress.close()
    from diaropt.backends.base import is_macos
    from diaropt.variants.build import _value

    quant_mode, macos = str(_value(cfg.quant.mode)), is_macos()
    summary = {**_run_facts(built, quant_mode, macos), "models": _models_summary(built), "files": len(written),
               "failed": len(failed), **_timings(timer.metrics(audio_duration_s), built.backend, quant_mode, macos),
               "written": written, "failed_files": failed}
    print(json.dumps(summary, indent=1))
    # stderr: stdout stays one JSON document
    print(f"{len(written)} RTTM file(s) written to {args.out.resolve()}"
          + (f"; {len(failed)} file(s) failed (see the errors above)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def _run_facts(built, quant_mode: str, macos: bool) -> dict[str, object]:
    """What ran, as the sweep logs it: backend, quant mode and how the backend realized it
    (``quant.realized``), the realized fusion switches (``segmentation.sinc_shared`` null resolved
    per backend) and the timing / numerics sources (``diaropt.provenance``)."""
    from diaropt.provenance import provenance
    from diaropt.variants.quant import realization

    source = provenance(built.backend, quant_mode, macos)
    return {"backend": built.backend, "quant": quant_mode, "quant_realized": realization(quant_mode, built.backend),
            "fusion": {name: bool(on) for name, on in built.fusion.items()},
            "timing_source": source.timing_source, "numerics_source": source.numerics_source,
            **({"timing_source_reason": source.reason} if source.reason else {})}


def _timings(metrics: dict[str, float], backend: str, quant_mode: str, macos: bool) -> dict[str, float]:
    """The stage timings and RTFx rounded, or none of them when they are not the configuration's
    own engine's (``backend=coreml`` off macOS runs diaropt's ML-program executor, whose speed is
    not Core ML's: ``timing_source`` ``not_measured``, as in a sweep job's metrics)."""
    from diaropt.provenance import provenance, without_timings

    rounded = {k: round(v, 4) for k, v in metrics.items()}
    return rounded if provenance(backend, quant_mode, macos).logs_timings else without_timings(rounded)


def _models_summary(built) -> dict[str, dict]:
    """What ran, per model kind: its model-cache key, its quant mode, how this backend realizes it (e.g.
    ONNX Runtime's own static int8 vs the Core ML package's weights) and, for int8 modes, how many nodes
    are int8 or why the graph was left fp32: the JSON summary says which models produced the RTTM."""
    keys = ("content_key", "quant", "onnx_quant", "int8_nodes", "kept_fp32", "calibration_windows")
    return {model.kind: {k: model.info[k] for k in keys if model.info.get(k) is not None}
            for model in built.models()}


def ui(argv: list[str]) -> int:
    """Exit codes: 0 served until Ctrl-C; 1 the server stopped by itself; 2 bad arguments or
    configuration; 3 no store / no experiment / port in use / the server did not start (one line: why)."""
    from diaropt.tracking.ui import DEFAULT_HOST, DEFAULT_PORT, STARTUP_TIMEOUT_S

    parser = argparse.ArgumentParser(
        prog="python -m diaropt ui",
        description="Start MLflow's server on the sweeps' store (as the sweep resolves it: tracking.tracking_uri, "
                    "$MLFLOW_TRACKING_URI, or sqlite under mlruns/) and print the address of the experiment's runs "
                    "table; Ctrl-C stops it. Overrides: tracking.tracking_uri=URI tracking.experiment_name=NAME.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST})")
    parser.add_argument("--open", action="store_true", help="open the runs table in the default browser")
    parser.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S,
                        help=f"seconds to wait for the server to answer (default {STARTUP_TIMEOUT_S:.0f})")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown options {bad}; configuration overrides look like key=value")
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: not a TCP port (1-65535)")

    from diaropt.config import OVERRIDE_ERRORS, REPO_ROOT, compose
    from diaropt.tracking.store import resolve_tracking_uri
    from diaropt.tracking.ui import UiError, serve

    try:
        cfg = compose(overrides)
    except OVERRIDE_ERRORS as error:
        print(f"error: bad configuration override: {error}", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, REPO_ROOT)  # exactly as the sweep's jobs do
    try:
        return serve(uri, str(cfg.tracking.experiment_name), args.host, args.port, args.open, args.timeout)
    except UiError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # during startup: start_server stopped the server
        print("interrupted; the MLflow server was stopped", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"diarize": diarize, "ui": ui}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m diaropt {{{','.join(commands)}}} ...  "
              "(try: python -m diaropt diarize --help, python -m diaropt ui --help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
