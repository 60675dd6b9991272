"""Progress a person can follow: one place for the bars of downloads, model builds, the parity reference
and the pipeline's files and stages (tqdm, on stderr).

Bars are shown only when stderr is a terminal, and never when ``TQDM_DISABLE`` (any value but ``0``,
``false``, ``no`` or empty) or ``DIAROPT_PROGRESS=0`` is set, so logs redirected to a file or a CI
console stay plain log lines. Call sites are one-liners::

    for item in progress.iterate(dataset, desc="files", unit="file", label=lambda item: item.uri): ...
    with progress.step("building embedding onnxruntime int8"): ...   # one line with the elapsed time

While a bar is shown, log lines printed to the terminal go above it (:func:`logging_redirect`),
never into it. Off a terminal, third-party tqdm bars (coremltools' conversion passes) are turned off
too (:func:`plain_output_off_terminal`, called by ``diaropt.quiet.quiet_third_party``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from tqdm import tqdm

_FALSE = {"", "0", "false", "no", "off"}


def enabled(stream: IO[str] | None = None) -> bool:
    """True when progress should be drawn on ``stream`` (default: stderr): it is a terminal and neither
    ``TQDM_DISABLE`` nor ``DIAROPT_PROGRESS=0`` turns bars off."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE:
        return False
    if os.environ.get("DIAROPT_PROGRESS", "1").strip().lower() in _FALSE - {""}:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: float | None = None, unit: str = "it",
        leave: bool = False, disable: bool | None = None, file: IO[str] | None = None, **options: Any) -> tqdm:
    """A tqdm bar on stderr (``file``), disabled unless :func:`enabled` (or ``disable`` says otherwise).

    ``unit="B"`` scales to kB/MB/GB (``unit_scale`` and 1024 divisor are set for it)."""
    from tqdm.auto import tqdm  # here, not at import: see plain_output_off_terminal

    file = sys.stderr if file is None else file
    if disable is None:
        disable = not enabled(file)
    if unit == "B":
        options.setdefault("unit_scale", True)
        options.setdefault("unit_divisor", 1024)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, file=file,
                dynamic_ncols=True, **options)


def iterate(iterable: Iterable[Any], *, desc: str, unit: str = "it", label: Callable[[Any], str] | None = None,
            total: int | None = None, disable: bool | None = None, file: IO[str] | None = None) -> Iterator[Any]:
    """The items of ``iterable`` under a bar ``desc``; ``label(item)`` (e.g. the file name) is shown
    beside it while that item is processed, and log lines go above the bar (:func:`logging_redirect`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with logging_redirect(), bar(iterable, desc=desc, total=total, unit=unit, disable=disable, file=file) as line:
        for item in line:
            if label is not None and not line.disable:
                line.set_postfix_str(label(item))
            yield item


@contextlib.contextmanager
def step(desc: str, *, disable: bool | None = None, file: IO[str] | None = None,
         refresh_s: float = 1.0) -> Iterator[tqdm]:
    """One line ``<desc> <elapsed>`` while the ``with`` body runs (e.g. a model conversion that reports
    no progress of its own), refreshed every ``refresh_s`` seconds, removed when done."""
    line = bar(desc=desc, total=None, disable=disable, file=file, bar_format="{desc} [{elapsed}]")
    stop = threading.Event()
    ticker = None
    if not line.disable:
        def tick() -> None:
            while not stop.wait(refresh_s):
                line.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    try:
        with logging_redirect():
            yield line
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        line.close()


@contextlib.contextmanager
def logging_redirect() -> Iterator[None]:
    """While bars are shown, the root logger's terminal handlers print through ``tqdm.write`` (above
    the bars) instead of over them; file handlers are untouched. A no-op when bars are off."""
    if not enabled():
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm([logging.getLogger()]):
        yield


def plain_output_off_terminal() -> None:
    """Set ``TQDM_DISABLE=1`` when stderr is not a terminal (and the variable is unset), so that the
    bars third-party code draws with tqdm (coremltools' conversion passes) do not fill a redirected
    log with carriage-return frames. tqdm reads the variable when it is first imported: call this at
    an entry point, before anything imports tqdm (``diaropt.quiet.quiet_third_party`` does)."""
    if "TQDM_DISABLE" not in os.environ and not enabled():
        os.environ["TQDM_DISABLE"] = "1"


def size_text(num_bytes: float) -> str:
    """``13963479`` -> ``'13.3 MB'`` (binary multiples, as the bars show)."""
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
