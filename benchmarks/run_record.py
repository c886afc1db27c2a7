"""What every benchmark record states about where and when it was measured: the CPU, the commit
and the load average of the (shared) machine. Imported by the scripts beside it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    """The commit measured (``+dirty`` when ppvae/ has uncommitted changes), if in a git tree."""
    try:
        run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        head = run("git", "rev-parse", "--short", "HEAD").strip()
        return head + ("+dirty" if run("git", "status", "--porcelain", "ppvae").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (others' work on a shared machine)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
