"""What the benchmarks share: a private LAP on free ports, and the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1, where Ray's own servers never bind (lap/local/ports.py)."""
    from lap.local.ports import free_ports as pick

    return pick(count)


def write_private_config(folder: Path, **extra: dict) -> Path:
    """A config for a LAP of the benchmark's own, in `folder`, on free ports; `extra` adds to its sections."""
    folder.chmod(0o755)  # Postgres runs as an unprivileged user when we are root
    ports = free_ports(10)
    config = {
        "data_dir": str(folder / "data"),
        "local": dict(zip(("postgres_port", "kinesis_port", "s3_port", "opensearch_port"), ports)),
        "ray": {"http_port": ports[4], "dashboard_port": ports[5], "haproxy_stats_port": ports[6],
                "haproxy_metrics_port": ports[7], "metrics_port": ports[8], "fallback_proxy_port": ports[9]},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path = folder / "lap.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lap(*args: str, config: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run the `lap` command against `config`, ignoring any LAP_ variables of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    return subprocess.run([sys.executable, "-m", "lap", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def start_lap(config: Path) -> bool:
    """`lap up --detach` with this config; prints why when it fails."""
    print("starting LAP...", file=sys.stderr, flush=True)
    up = lap("up", "--detach", config=config)
    if up.returncode != 0:
        print(up.stdout, up.stderr, file=sys.stderr)
    return up.returncode == 0


def write_report(path: Path, report: dict) -> None:
    """The benchmark's JSON, next to the table it printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
