"""What the test suite needs from the machine beyond Python, and what happens without it.

The README's test command (``pip install -e '.[test]' && pytest``) passes on a machine that has
nothing but Python: a test that needs a program pip cannot install (a browser, node) skips with
a message naming the package to install. CI, which installs those packages, sets
``POOLRELAY_CI=1``, and there a missing program fails the test instead of hiding it as a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """``POOLRELAY_CI=1``: everything a test needs must be there."""
    return os.environ.get("POOLRELAY_CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for want of something outside Python (fail it in CI)."""
    if in_ci():
        pytest.fail(f"{reason} (POOLRELAY_CI=1: CI must provide it)", pytrace=False)
    pytest.skip(reason)


def require_program(names: str | Sequence[str], *, install_hint: str) -> str:
    """The path of the first of ``names`` on ``PATH``; without one, skip the test with a message
    naming what to install (``install_hint``, e.g. ``apt-get install chromium``), or fail it
    when ``POOLRELAY_CI=1``."""
    candidates = [names] if isinstance(names, str) else list(names)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    unavailable(f"needs {' or '.join(candidates)} on PATH: install it with `{install_hint}`")
