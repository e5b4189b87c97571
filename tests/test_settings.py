"""The settings model: sources, precedence, local and AWS modes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from lap.settings import ConfigError, load_settings
from tests.support.stack import run_lap


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LAP_"):
            monkeypatch.delenv(key)


def test_defaults_point_at_local_stand_ins():
    s = load_settings()
    assert s.mode == "local"
    assert s.stream.shards == 4
    assert s.stream.endpoint_url == "http://127.0.0.1:4567"
    assert s.archive.endpoint_url == "http://127.0.0.1:4568"
    assert s.index.url == "http://127.0.0.1:9200"
    assert "@127.0.0.1:5433/lap" in s.db.dsn.get_secret_value()
    assert s.ray.http_host == "127.0.0.1" and s.ray.http_port == 8000
    assert s.local_services() == ["postgres", "kinesis", "s3", "opensearch"]
    assert s.data_dir.is_absolute() and s.data_dir.name == ".lap"


def test_env_vars_set_nested_sections(monkeypatch):
    monkeypatch.setenv("LAP_STREAM__SHARDS", "8")
    monkeypatch.setenv("LAP_LOCAL__KINESIS_PORT", "14567")
    monkeypatch.setenv("LAP_LIMITS__MAX_BODY_BYTES", "2048")
    s = load_settings()
    assert s.stream.shards == 8
    assert s.stream.endpoint_url == "http://127.0.0.1:14567"
    assert s.limits.max_body_bytes == 2048


def test_yaml_file_and_env_precedence(tmp_path: Path, monkeypatch):
    config = tmp_path / "lap.yaml"
    config.write_text("stream:\n  name: from-file\n  shards: 2\narchive:\n  bucket: file-bucket\n")
    monkeypatch.setenv("LAP_STREAM__SHARDS", "6")
    s = load_settings(config)
    assert s.stream.name == "from-file"
    assert s.stream.shards == 6  # the environment beats the file
    assert s.archive.bucket == "file-bucket"
    monkeypatch.setenv("LAP_CONFIG", str(config))
    assert load_settings().archive.bucket == "file-bucket"  # LAP_CONFIG names the same file


def test_unknown_and_invalid_keys_are_refused_clearly(tmp_path: Path):
    config = tmp_path / "lap.yaml"
    config.write_text("stream:\n  shardz: 3\n")
    with pytest.raises(ConfigError, match=r"stream\.shardz"):
        load_settings(config)
    config.write_text("stream:\n  shards: 0\n")
    with pytest.raises(ConfigError, match=r"stream\.shards"):
        load_settings(config)
    config.write_text("stream: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read settings"):
        load_settings(config)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.yaml")


def test_aws_mode_needs_endpoints_and_starts_no_stand_ins(tmp_path: Path):
    with pytest.raises(ConfigError, match="LAP_DB__DSN and LAP_INDEX__URL"):
        load_settings(mode="aws")
    config = tmp_path / "aws.yaml"
    config.write_text(
        "mode: aws\n"
        "aws: {region: eu-west-1}\n"
        "db: {dsn: 'postgresql://lap:secret@db.internal:5432/lap'}\n"
        "index: {url: 'https://search.example.internal:443'}\n"
        "ray: {address: auto}\n"
    )
    s = load_settings(config)
    assert s.local_services() == []
    # Kinesis and S3 use the AWS endpoints of the region; credentials come from the default chain.
    assert s.stream.endpoint_url is None and s.archive.endpoint_url is None
    kwargs = s.aws_client_kwargs(s.stream.endpoint_url)
    assert kwargs == {"region_name": "eu-west-1"}
    for section in (s.stream, s.archive, s.index, s.db, s.aws):
        assert "127.0.0.1" not in section.model_dump_json()
    from lap.local.stack import LocalStack

    assert LocalStack(s).processes == []  # what `lap up` would start: nothing


def test_stand_in_keys_go_only_to_stand_ins():
    s = load_settings(stream={"endpoint_url": "https://kinesis.eu-west-1.amazonaws.com"})
    assert "aws_access_key_id" not in s.aws_client_kwargs(s.stream.endpoint_url)
    assert s.aws_client_kwargs(s.archive.endpoint_url)["aws_access_key_id"] == "S3RVER"
    assert s.local_services() == ["postgres", "s3", "opensearch"]


def test_one_service_pointed_elsewhere_is_not_started():
    s = load_settings(index={"url": "https://search.example.internal"})
    assert s.local_services() == ["postgres", "kinesis", "s3"]


def test_secrets_do_not_show_in_repr():
    s = load_settings(db={"dsn": "postgresql://u:hunter2@h/db"})
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


@hsettings(max_examples=50, deadline=None)
@given(ports=st.lists(st.integers(1, 65535), min_size=4, max_size=4, unique=True))
def test_local_ports_drive_every_endpoint(ports):
    pg, kin, s3, os_ = ports
    s = load_settings(local={"postgres_port": pg, "kinesis_port": kin, "s3_port": s3, "opensearch_port": os_})
    assert s.stream.endpoint_url.endswith(f":{kin}")
    assert s.archive.endpoint_url.endswith(f":{s3}")
    assert s.index.url.endswith(f":{os_}")
    assert f":{pg}/" in s.db.dsn.get_secret_value()
    assert s.local_services() == ["postgres", "kinesis", "s3", "opensearch"]


def test_cli_reports_config_errors_without_traceback(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  http_port: not-a-port\n")
    for args in (["up"], ["status"], ["keys", "list"]):
        result = run_lap(*args, config=bad, check=False, timeout=60)
        assert result.returncode != 0
        assert "ray.http_port" in result.stderr
        assert "Traceback" not in result.stderr
    result = run_lap("up", config=tmp_path / "missing.yaml", check=False, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
