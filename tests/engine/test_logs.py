"""engine/logs.py: the root handler the CLI installs in each process."""

import io
import json
import logging
import sys

import pytest

from credit_engine.engine.logs import StderrHandler, configure_logging


@pytest.fixture
def root(monkeypatch: pytest.MonkeyPatch) -> logging.Logger:
    """The root logger, whose handlers and level are put back after the test."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    return root


def bare(root: logging.Logger) -> logging.Logger:
    """As a fresh process has it: no handlers (pytest adds its own when the test starts)."""
    root.handlers.clear()
    return root


def test_a_stderr_swapped_and_closed_meanwhile_does_not_break_later_lines(
    root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() run in-process under a capture once left the root handler bound to the closed
    capture: every later line in the process failed with 'I/O operation on closed file'."""
    bare(root)
    configure_logging("INFO", "json")
    swapped, real = io.StringIO(), sys.stderr
    sys.stderr = swapped
    try:
        logging.getLogger("engine.test").warning("while swapped")
    finally:
        sys.stderr = real
    swapped_text = swapped.getvalue()
    swapped.close()
    logging.getLogger("engine.test").warning("after %s", "closing")
    err = capsys.readouterr().err
    assert json.loads(swapped_text)["message"] == "while swapped"
    assert json.loads(err)["message"] == "after closing" and "Logging error" not in err


def test_a_second_call_replaces_the_handler_and_a_foreign_root_is_left_alone(root: logging.Logger) -> None:
    bare_root = bare(root)
    configure_logging("INFO", "text")
    configure_logging("DEBUG", "json")
    assert [type(h) for h in bare_root.handlers] == [StderrHandler] and bare_root.level == logging.DEBUG
    foreign = logging.NullHandler()
    bare_root.handlers[:] = [foreign]
    configure_logging("WARNING", "text")
    assert bare_root.handlers == [foreign] and bare_root.level == logging.DEBUG
