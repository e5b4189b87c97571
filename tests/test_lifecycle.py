"""`lap up` in the foreground, as `make run` runs it, stopped by Ctrl-C.

It runs in `mode: aws` against the session's stand-ins, as if they were AWS,
so it also shows that such a config starts no stand-ins of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from lap.settings import LOCAL_AWS_KEY, load_settings
from tests.conftest import LAP, assert_all_gone, descendants, free_port


def test_foreground_up_in_aws_mode_then_ctrl_c_leaves_nothing(lap_up, tmp_path: Path):
    shared = lap_up.settings
    tmp_path.chmod(0o755)
    config = tmp_path / "aws-like.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "aws",
        "data_dir": str(tmp_path / "data"),
        "aws": {"access_key_id": LOCAL_AWS_KEY, "secret_access_key": LOCAL_AWS_KEY},
        "stream": {"endpoint_url": shared.stream.endpoint_url},
        "archive": {"endpoint_url": shared.archive.endpoint_url},
        "index": {"url": shared.index.url},
        "db": {"dsn": shared.db.dsn.get_secret_value()},
        "ray": {"http_port": free_port(), "dashboard_port": free_port()},
    }))
    settings = load_settings(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    log = open(tmp_path / "up.log", "wb")
    # Its own session, so that a signal to the group is what a terminal's Ctrl-C does.
    proc = subprocess.Popen([*LAP, "up", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                reply = httpx.get(f"{settings.api_url}/healthz", timeout=5)
                ready = reply.status_code == 200 and (settings.run_dir / "state.json").exists()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        output = (tmp_path / "up.log").read_text()
        assert ready, f"not ready; exit code {proc.poll()}; output:\n{output}"
        assert "LAP is up" in output and f"{settings.api_url}/docs" in output

        children = descendants(proc.pid)
        commands = " ".join(" ".join(p.cmdline()) for p in children if p.is_running())
        for stand_in in ("osmem-server", "kinesalite", "s3rver", "bin/postgres"):
            assert stand_in not in commands, f"mode aws started {stand_in}"

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(120) == 0
        assert_all_gone(children, settings)
        assert "LAP stopped" in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    # The shared stack was not disturbed.
    assert httpx.get(f"{shared.api_url}/healthz", timeout=10).status_code == 200
