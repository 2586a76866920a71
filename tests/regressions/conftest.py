"""Regressions found by adversarial reviews of the promises-at-the-edges change: each file states
the defect it found (they are fixed; the tests now check the fix). Fixtures are the web app's and
the kill switch's, re-exported."""

from tests.engine.test_end_queue import qrt  # noqa: F401
from tests.webapp.conftest import api, app_settings  # noqa: F401
from tests.webapp.test_kill_switch import fake, http, outbound, worker_rt, world  # noqa: F401
