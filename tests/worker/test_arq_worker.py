"""worker/arq_worker.py overrides and copies private methods of arq's Worker: the day arq changes
one of them, this fails, and the override is re-read against the new code before the pin moves."""

import tomllib
from pathlib import Path

import arq

from credit_engine.worker.arq_worker import ARQ_SOURCES, ARQ_VERSION, CreditEngineWorker, arq_source_fingerprint


def test_arq_is_the_exact_release_the_override_was_written_against() -> None:
    assert arq.VERSION == ARQ_VERSION
    dependencies = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert f"arq=={ARQ_VERSION}" in dependencies["dependencies"]


def test_every_arq_method_the_override_relies_on_is_as_it_was_read() -> None:
    changed = {name for name, fingerprint in ARQ_SOURCES.items() if arq_source_fingerprint(name) != fingerprint}
    assert changed == set(), f"arq changed {sorted(changed)}: re-read worker/arq_worker.py against it"


def test_the_fingerprints_cover_every_method_the_subclass_overrides() -> None:
    overridden = {name for name in vars(CreditEngineWorker) if callable(getattr(CreditEngineWorker, name))}
    ours_alone = {"_claim_and_start", "_note_stop", "_start_up"}
    overridden -= {name for name in overridden if name.startswith("__")} | ours_alone
    assert overridden <= set(ARQ_SOURCES), overridden - set(ARQ_SOURCES)
