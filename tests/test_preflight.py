"""`lap preflight` against the running local stack, and against the deploy files' placeholders (no AWS here)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from tests.support.stack import LAP, run_lap
from lap.local.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
CHECKS = ["settings", "placeholders", "secret", "iam", "kinesis", "s3", "retention", "postgres", "opensearch", "load balancer"]


def lines_of(output: str) -> dict[str, tuple[str, str]]:
    """check name -> (status, detail), from the command's one line per check."""
    found = {}
    for line in output.splitlines():
        match = re.fullmatch(r"(ok|FAIL|skip)\s+(.+?)\s{2,}(.*)", line)
        if match:
            found[match[2]] = (match[1], match[3])
    return found


def preflight(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LAP_", "AWS_"))}
    return subprocess.run([*LAP, "preflight", *args], capture_output=True, text=True, timeout=120,
                          env=clean | {"AWS_EC2_METADATA_DISABLED": "true"} | env)


def test_preflight_passes_against_the_running_local_stack(lap_up):
    result = run_lap("preflight", config=lap_up.config)
    checks = lines_of(result.stdout)
    assert list(checks) == CHECKS, result.stdout
    assert {name for name, (status, _) in checks.items() if status == "skip"} == {"secret", "iam", "load balancer"}
    assert all(status == "ok" for name, (status, _) in checks.items()
               if name not in ("secret", "iam", "load balancer")), result.stdout
    assert f"stream {lap_up.settings.stream.name} active" in checks["kinesis"][1]
    assert "written, read back and deleted" in checks["s3"][1]
    assert "schema up to date" in checks["postgres"][1] and "GiB free" in checks["postgres"][1]
    assert result.stdout.rstrip().endswith("ready for traffic")


def test_preflight_fails_on_a_stream_or_bucket_that_does_not_exist(lap_up, tmp_path):
    config = yaml.safe_load(lap_up.config.read_text())
    config["stream"] = {"name": "no-such-stream"}
    config["archive"] = {"bucket": "no-such-bucket"}
    path = tmp_path / "lap.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_lap("preflight", config=path, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines_of(result.stdout)
    assert checks["kinesis"][0] == "FAIL" and "ResourceNotFound" in checks["kinesis"][1], checks["kinesis"]
    assert checks["s3"][0] == "FAIL", checks["s3"]
    assert checks["postgres"][0] == "ok" and checks["opensearch"][0] == "ok"
    assert "Traceback" not in result.stdout + result.stderr
    assert "NOT ready" in result.stdout


def test_preflight_refuses_the_placeholders_of_the_deploy_files():
    env_script = next(c for c in yaml.safe_load((REPO / "cluster.yaml").read_text())["setup_commands"]
                      if "lap_target_group=" in c)
    secret_id = re.search(r"lap_secret_id=(\S+)", env_script)[1]
    target_group = re.search(r"lap_target_group=(\S+)", env_script)[1]
    (closed,) = free_ports(1)
    result = preflight("--config", str(REPO / "deploy/lap-aws.yaml"), "--secret-id", secret_id,
                       "--target-group", target_group,
                       env={"LAP_DB__DSN": f"postgresql://lap:do-not-print@127.0.0.1:{closed}/lap"})
    assert result.returncode == 1, result.stdout + result.stderr
    checks = lines_of(result.stdout)
    assert list(checks) == CHECKS, result.stdout
    status, detail = checks["placeholders"]
    assert status == "FAIL" and "123456789012" in detail and "0123456789abcdef" in detail, detail
    # nothing is asked of an endpoint that is still an example, and no check passes against a placeholder
    for name in ("iam", "opensearch", "load balancer"):
        assert checks[name] == ("skip", "not tried: what it would call is a placeholder"), checks[name]
    assert checks["postgres"][0] == "FAIL" and "ConnectionRefused" in checks["postgres"][1]
    assert "Traceback" not in result.stdout + result.stderr
    assert "do-not-print" not in result.stdout + result.stderr


def test_preflight_says_why_settings_do_not_load_and_still_finds_placeholders():
    result = preflight("--config", str(REPO / "deploy/lap-aws.yaml"), env={})
    assert result.returncode == 1
    checks = lines_of(result.stdout)
    assert checks["settings"][0] == "FAIL" and "LAP_DB__DSN" in checks["settings"][1], checks["settings"]
    assert checks["placeholders"][0] == "FAIL" and "0123456789abcdef" in checks["placeholders"][1]
    assert all(checks[name] == ("skip", "the settings do not load") for name in CHECKS[2:]), result.stdout
    assert "Traceback" not in result.stdout + result.stderr
