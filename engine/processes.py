"""How one of the engine's processes starts another: always the installed `credit_engine`, never a
folder that happens to sit in the working directory.

`python -m` puts the working directory first on `sys.path`, so a checkout's `engine/` (or an old
`credit_engine/`) there would shadow the installed code in the child while the parent ran the real
one. `-P` (Python 3.11+) leaves the working directory off the path; the environment, and with it
`PYTHONPATH` for whoever sets it deliberately, passes through unchanged.
"""

import sys

PACKAGE = "credit_engine"


def cli(*args: str, python: str | None = None) -> list[str]:
    """The `credit-engine ARGS` command line, run by this interpreter (or `python`)."""
    return module(PACKAGE, *args, python=python)


def module(name: str, *args: str, python: str | None = None) -> list[str]:
    """`python -P -m NAME ARGS`, for a module of the package (`credit_engine.loadtest.…`)."""
    assert name == PACKAGE or name.startswith(PACKAGE + "."), name
    return [python or sys.executable, "-P", "-m", name, *args]


def tool(name: str, *args: str) -> list[str]:
    """`python -P -m NAME ARGS` for an installed tool the load runs start (uvicorn, locust): from
    this interpreter's environment, with the working directory off its path too."""
    assert not name.startswith(PACKAGE), name
    return [sys.executable, "-P", "-m", name, *args]
