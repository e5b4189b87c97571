"""What the benchmarks share: a private LAP on free ports, and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a private LAP is made as the tests make theirs
from tests.support.stack import run_lap, write_config  # noqa: E402

__all__ = ["lap", "machine", "own_lap", "start_lap", "write_config", "write_report"]


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


@contextmanager
def own_lap(name: str, **sections) -> Iterator[tuple[Path, object]]:
    """A LAP of the benchmark's own, with these settings sections: `lap up --detach` on free ports in a temporary
    folder, stopped and removed at the end; (its config file, its settings). Exits 1 when it does not start."""
    from lap.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix=f"lap-bench-{name}-"))
    try:
        config = write_config(folder, **sections)
        if not start_lap(config):
            raise SystemExit(1)
        try:
            yield config, load_settings(config)
        finally:
            lap("down", config=config)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_report(path: Path, report: dict) -> None:
    """The benchmark's JSON, next to the table it printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
