"""What the benchmarks share: a private LAP on free ports, and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a private LAP is made as the tests make theirs
from tests.support.stack import run_lap, write_config  # noqa: E402

__all__ = ["lap", "machine", "start_lap", "write_config", "write_report"]


def lap(*args: str, config: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    """The `lap` command against `config`; its exit code is the caller's to judge."""
    return run_lap(*args, config=config, timeout=timeout, check=False)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def start_lap(config: Path) -> bool:
    """`lap up --detach` with this config; prints why when it fails."""
    print("starting LAP...", file=sys.stderr, flush=True)
    up = run_lap("up", "--detach", config=config)
    if up.returncode != 0:
        print(up.stdout, up.stderr, file=sys.stderr)
    return up.returncode == 0


def write_report(path: Path, report: dict) -> None:
    """The benchmark's JSON, next to the table it printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
