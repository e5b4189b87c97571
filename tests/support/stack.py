"""A LAP of one's own: free ports, a config in a folder, the `lap` command, and checks that it left nothing
behind. The tests' session LAP and the benchmarks' private ones are made with these."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from lap.settings import Settings

LAP = [sys.executable, "-m", "lap"]



def free_port() -> int:
    from lap.local.ports import free_port as pick

    return pick()


def write_config(folder: Path, **extra) -> Path:
    """A config for a private LAP in `folder`, on free ports."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # Postgres runs as an unprivileged user when we are root
    from lap.local.ports import free_ports

    ports = free_ports(11)
    config = {
        "data_dir": str(folder / "data"),
        "local": dict(zip(("postgres_port", "kinesis_port", "s3_port", "opensearch_port", "opensearch_transport_port"),
                          [*ports[:4], ports[10]])),
        "ray": {"http_port": ports[4], "dashboard_port": ports[5], "metrics_port": ports[6],
                "haproxy_stats_port": ports[7], "haproxy_metrics_port": ports[8], "fallback_proxy_port": ports[9]},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    path = folder / "lap.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_lap(*args: str, config: Path | None = None, timeout: float = 120, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
    argv = [*LAP, *args] + (["--config", str(config)] if config else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def listening_ports(settings: Settings) -> list[int]:
    stand_ins = {"postgres": settings.local.postgres_port, "kinesis": settings.local.kinesis_port,
                 "s3": settings.local.s3_port, "opensearch": settings.local.opensearch_port}
    ports = [stand_ins[name] for name in settings.local_services()]
    ports += [settings.ray.http_port, settings.ray.dashboard_port, settings.ray.metrics_port,
              settings.ray.haproxy_stats_port, settings.ray.haproxy_metrics_port, settings.ray.fallback_proxy_port]
    open_ = []
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                open_.append(port)
    return open_


def assert_all_gone(processes: list[psutil.Process], settings: Settings, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive and not listening_ports(settings):
            return
        time.sleep(0.5)
    names = [f"{p.pid}:{p.name()}" for p in alive]
    raise AssertionError(f"left behind: processes {names}, listening ports {listening_ports(settings)}")
