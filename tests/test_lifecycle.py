"""`lap up` in the foreground, as `make run` runs it, stopped by Ctrl-C.

It runs before the session's LAP starts (see conftest), so that only one Ray
runs at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from lap.settings import load_settings
from tests.support.stack import assert_all_gone, descendants, LAP, run_lap, write_config


def test_foreground_up_then_ctrl_c_leaves_nothing():
    folder = Path(tempfile.mkdtemp(prefix="lap-lifecycle-"))
    config = write_config(folder)
    settings = load_settings(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAP_")}
    out_path = folder / "up.log"
    with open(out_path, "wb") as out:
        # Its own session, so that a signal to the group is what a terminal's Ctrl-C does.
        proc = subprocess.Popen([*LAP, "up", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
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
        output = out_path.read_text()
        assert ready, f"not ready; exit code {proc.poll()}; output:\n{output}"
        assert "LAP is up" in output and f"{settings.api_url}/docs" in output

        children = descendants(proc.pid)
        commands = " ".join(" ".join(p.cmdline()) for p in children if p.is_running())
        for stand_in in ("org.opensearch.bootstrap.OpenSearch", "kinesalite", "s3rver", "bin/postgres", "raylet"):
            assert stand_in in commands, f"{stand_in} is not running under `lap up`"

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(120) == 0
        assert_all_gone(children, settings)
        output = out_path.read_text()
        assert "LAP stopped" in output and "did not stop within" not in output, output[-3000:]
        assert not (settings.run_dir / "lap.pid").exists()
        assert run_lap("status", config=config, check=False, timeout=60).returncode == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
