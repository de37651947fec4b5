"""Where a record came from: the git commit (and whether the tree was dirty),
the time, the machine's load.  Every record of ``train`` (config.json,
result.json) and of ``bench`` (the results JSON's meta) carries it, so that a
number can be traced to the code and the conditions that produced it.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_average() -> Optional[list]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state(paths=()) -> dict:
    """{"commit": full hash or None, "dirty": uncommitted changes to tracked files
    (under ``paths`` when given, else anywhere), or None outside a git checkout}."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        # Untracked files (results, runs) do not make the code dirty.
        status = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def record(started_at: Optional[str] = None) -> dict:
    """{"git": git_state(), "started_at", "load_average"}: what a record holds."""
    return {"git": git_state(), "started_at": started_at or now(), "load_average": load_average()}
