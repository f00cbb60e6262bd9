"""External programs some tests need (Prometheus and its promtool; Chromium and its
chromedriver), and what a test does where one is missing.

`make test` installs them (Debian's packages: prometheus brings promtool, chromium-driver
brings chromedriver; the Makefile's `prometheus` and `browser` targets, as root as in CI)
and sets `REQUIRE_VARIABLE`: there a missing program fails the tests that need it, naming it
and how to install it, instead of skipping them unseen (a check that silently stopped
running in CI). Anywhere else (a bare `pytest`, `make test-fast`) those tests skip and say why.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_VARIABLE = "CLIPLORA_TEST_REQUIRE_TOOLS"
INSTALL = "apt-get install -y prometheus (`make test` does it when run as root)"
BROWSER_INSTALL = "apt-get install -y chromium chromium-driver (`make test` does it when run as root)"


def require(program: str, install: str = INSTALL) -> str:
    """The path of `program`; where it is missing, skip the test, or fail it under `make test`
    (`install` says how to get it)."""
    path = shutil.which(program)
    if path is not None:
        return path
    message = f"{program} is not installed: {install}"
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{message}; `make test` needs it ({REQUIRE_VARIABLE}=1)", pytrace=False)
    pytest.skip(message)
