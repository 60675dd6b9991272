"""``python -m diaropt diarize AUDIO... --out DIR [OVERRIDES...]``: one RTTM per file.

Overrides are the sweep's (Hydra syntax), e.g. ``quant=int8 backend=torch segmentation.step_s=2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def diarize(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m diaropt diarize", description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="+", type=Path, help="audio files (wav, flac, ogg, ...)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the RTTM files")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown options {bad}; configuration overrides look like key=value")

    from diaropt.backends.base import BackendUnavailable
    from diaropt.config import compose
    from diaropt.data.annotations import write_rttm
    from diaropt.pipeline.timing import StageTimer
    from diaropt.runner import ChunkProgress, load_pipeline
    from diaropt.variants.build import build_models

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:  # before any work
        print(f"error: bad configuration override: {error}", file=sys.stderr)
        return 2
    missing = [str(path) for path in args.audio if not path.is_file()]
    if missing:
        print(f"error: no such audio file: {', '.join(missing)}", file=sys.stderr)
        return 2
    timer = StageTimer()
    progress = ChunkProgress(enabled=not args.no_progress)
    try:  # a refusal at build (e.g. quant=w8a8 off macOS) or at load: one line, exit 3
        built = build_models(cfg)
        pipeline = load_pipeline(cfg, built, timer, progress)
    except BackendUnavailable as error:
        print(f"error: this configuration cannot run on this host: {error.reason}", file=sys.stderr)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    audio_duration_s = 0.0
    failures = 0
    from tqdm.auto import tqdm

    for path in tqdm(args.audio, desc="files", unit="file", disable=args.no_progress):
        try:
            output = pipeline(path, timer=timer)
        except ValueError as error:  # bad input: say which file and go on with the others
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        audio_duration_s += output.audio_duration_s
        write_rttm(output.annotation, args.out / f"{output.uri}.rttm", uri=output.uri)
    progress.close()
    summary = {"backend": built.backend, "files": len(args.audio) - failures, "failed": failures,
               **{k: round(v, 4) for k, v in timer.metrics(audio_duration_s).items()}}
    print(json.dumps(summary, indent=1))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"diarize": diarize}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m diaropt {{{','.join(commands)}}} ...  (try: python -m diaropt diarize --help)",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
