"""The committed lock is the tested environment: every installed distribution is pinned in
requirements.lock at exactly the version installed, and the lock holds nothing that is not installed.

`make test-unlocked` runs the suite on the newest releases on purpose and sets VRP_UNLOCKED=1, which
skips this check there (and only there).
"""
from __future__ import annotations

import os
import re
from importlib.metadata import distributions
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
SELF = "vrp-eval"  # installed from the checkout, not pinned


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not an exact `name==version` pin"
            pins[canonical(name)] = version
    return pins


@pytest.mark.skipif(os.environ.get("VRP_UNLOCKED") == "1", reason="make test-unlocked: newest releases on purpose")
def test_installed_environment_equals_the_lock():
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    installed.pop(SELF, None)
    pins = locked()
    differ = {name: (installed.get(name), pins.get(name)) for name in installed.keys() | pins.keys()
              if installed.get(name) != pins.get(name)}
    assert not differ, ("the environment is not the locked one ({name: (installed, locked)}): "
                        f"{dict(sorted(differ.items()))}. Run `make setup` for the locked set, or `make lock` "
                        "to re-lock after a deliberate dependency change.")


def test_lock_keeps_the_filelock_cap():
    # lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed (see pyproject.toml).
    assert int(locked()["filelock"].split(".")[0]) < 4
