"""The one settings model for LAP.

Sources, strongest first: keyword arguments, `LAP_` environment variables
(nested with `__`, e.g. `LAP_STREAM__SHARDS=8`), the YAML file named by
`--config` or `LAP_CONFIG`, then the defaults below.

`mode: local` (the default) runs against the local stand-ins that `lap up`
starts on 127.0.0.1; every endpoint left unset points at its stand-in.
`mode: aws` starts no stand-ins: Kinesis and S3 use the AWS defaults for the
region unless an `endpoint_url` is given, and the Postgres DSN and the
OpenSearch URL must be set.
"""

from __future__ import annotations

import os
import warnings
from datetime import datetime, timedelta, timezone
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent

# Credentials the S3 stand-in (s3rver) accepts; kinesalite accepts any.
LOCAL_AWS_KEY = "S3RVER"
LOCAL_DB_USER = "lap"
OPENSEARCH_VERSION = "2.19.6"  # the local index's engine; the Makefile installs the same
LOCAL_INDEX_RETENTION_DAYS = 7.0  # the local index shares one machine's disk with everything else
LOCAL_DB_PASSWORD = "lap-local"  # the stand-in listens on 127.0.0.1 only
LOCAL_DB_NAME = "lap"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AwsSettings(Section):
    region: str = "us-east-1"
    # Unset: the default AWS credential chain (instance profile, env, ~/.aws).
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


class StreamSettings(Section):
    name: str = "lap-events"
    shards: int = Field(4, ge=1, le=500, description="shard count when LAP creates the stream")
    endpoint_url: str | None = None
    # Ingest lists the open shards again this often (and at once when a reply shows a split or merge)
    shard_map_ttl_s: float = Field(60.0, gt=0)
    # Per ingest replica: a PutRecords call starts at most every put_linger_s (requests that arrive meanwhile
    # share it), with at most put_calls_in_flight calls at a time. Kinesis and its stand-in pay per call.
    put_linger_s: float = Field(0.025, ge=0, le=1)
    put_calls_in_flight: int = Field(2, ge=1, le=64)


class ArchiveSettings(Section):
    bucket: str = "lap-archive"
    endpoint_url: str | None = None
    prefix: str = "archive/v1"
    quarantine_prefix: str = "quarantine/v1"
    # What the shard consumers read from the stream (every copy of every event), per batch, tenant and hour
    receipts_prefix: str = "audit/receipts/v1"
    # The shard consumers' saved dedup state (sorted 8-byte fingerprints per shard and time bucket)
    dedup_prefix: str = "audit/dedup/v1"
    # Stream records a shard consumer could not process, kept as read, with the reason (docs/decisions.md)
    dead_letter_prefix: str = "dead-letter/v1"


class IndexSettings(Section):
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    index_prefix: str = "lap-events"
    verify_certs: bool = True
    # Moved to retention.index_days; still read from here (lap.settings moves it, and says so).
    retention_days: float | None = Field(None, ge=0, exclude=True)


class RetentionSettings(Section):
    """How long each store keeps what, in one place; docs/retention.md has the table and the reasons. The sweeper
    enforces what LAP deletes itself; `lap preflight` checks that the stream and the bucket's lifecycle rules agree.
    Receipts are kept for process.dedup_window_s: reconcile looks at single events only within it."""

    # Kinesis keeps records this long (24 h to 365 days): how long a lost batch can be replayed from the stream.
    # Set when LAP creates the stream.
    stream_hours: int = Field(24, ge=24, le=8760)
    # The archive, the record of every event: unset keeps it for good.
    archive_days: float | None = Field(None, gt=0)
    # Documents of events received longer ago leave the index, and a rebuild skips them (a replay indexes any
    # archived window again). Unset: 7 days in local mode, where the index shares one machine's disk; no limit
    # with AWS. 0: no limit.
    index_days: float | None = Field(None, ge=0)
    # Refused requests kept for people to read (rows and payloads).
    quarantine_days: float = Field(90, gt=0)
    # Dead letters a replay has stored; open ones are kept until one does (their events are stored nowhere else).
    dead_letter_days: float = Field(90, gt=0)
    # The per-learner figures, by the day of the events: unset keeps them for good.
    aggregates_days: float | None = Field(None, gt=0)


class DbSettings(Section):
    dsn: SecretStr | None = None
    # The owner of LAP's tables, used only to apply migrations (`lap_deploy` on a cluster's head). When set,
    # dsn's user gets reads and writes on the tables and nothing more. Unset: dsn's user owns them (local mode).
    admin_dsn: SecretStr | None = None
    pool_min: int = Field(1, ge=0)
    pool_max: int = Field(10, ge=1)
    connect_timeout_s: float = Field(10.0, gt=0)
    # A query that takes longer fails; a request waiting on it gets a 503 instead of hanging.
    command_timeout_s: float = Field(10.0, gt=0)


class AuthSettings(Section):
    # Replicas cache verified keys this long; a revocation takes effect within it.
    key_cache_ttl_s: float = Field(5.0, ge=0)


class LimitsSettings(Section):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body, after gunzip")
    max_record_bytes: int = Field(1024 * 1024, ge=1024, le=1024 * 1024, description="Kinesis: 1 MB per record")
    # Per key, unless the key has its own rate (`lap keys create --rate`).
    requests_per_s: float = Field(1000.0, gt=0)
    # How long a request may wait for Kinesis to acknowledge every record before a 503.
    put_deadline_s: float = Field(10.0, gt=0)
    # Refused payloads kept in the quarantine, per request.
    quarantine_payload_bytes: int = Field(256 * 1024, ge=0)


class CaliperSettings(Section):
    # Caliper 1.1 decimals may always be whole numbers (15 for 15.0): its sensors write them so, IMS's JavaScript
    # sensor among them. 1.2's conformance fixtures call them malformed, so 1.2 accepts them only when this is on.
    whole_number_decimals_v1p2: bool = Field(False, description="accept 15 for 15.0 in Caliper 1.2 decimals too")


class ProcessSettings(Section):
    """Stream processing: shard consumers, dedup, the index writer and the orphan sweeper."""

    batch_max_events: int = Field(10_000, ge=1, le=100_000, description="events per committed batch at most "
                                  "(a batch holds whole stream records: one record's events may pass it)")
    batch_max_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="stream bytes per batch at most")
    batch_max_wait_s: float = Field(1.0, gt=0, description="a batch commits at the latest this long after its first record")
    # A record holds a request's events for one shard (~12 KB before compression at 50 events a request): 200 a
    # call keep each reply near 1-2 MB, so one catching-up read never holds the stream stand-in for long
    get_records_limit: int = Field(200, ge=1, le=10_000, description="records per GetRecords call (Kinesis: 10,000)")
    idle_poll_s: float = Field(0.25, gt=0, description="first wait after an empty read; doubles up to max_poll_s")
    max_poll_s: float = Field(2.0, gt=0)
    # 8 bytes of consumer memory per event stored within it (docs/decisions.md, "Dedup"): 6.9 GB across the
    # consumers for 24 h at a steady 10K events/s
    dedup_window_s: float = Field(86400, ge=3600, description="an event id seen again within this is a duplicate")
    lease_ttl_s: float = Field(30.0, gt=1, description="a shard lease not renewed for this long may be taken over")
    coordinator_interval_s: float = Field(5.0, gt=0, description="how often shards are listed and consumers checked")
    index_enabled: bool = True
    index_batch_docs: int = Field(2000, ge=1, description="documents per OpenSearch bulk request at most")
    index_retry_s: float = Field(2.0, gt=0, description="first wait after a failed bulk; doubles up to 30 s")
    orphan_grace_s: float = Field(3600.0, ge=0, description="an archive object with no manifest is removed after this")
    sweep_interval_s: float = Field(600.0, gt=0)
    audit_flush_s: float = Field(2.0, gt=0, description="how often the audit actor writes shard status")
    # The shard consumers, the index writer, the local archive and index stand-ins and their Postgres work run as
    # background CPU work (Linux SCHED_IDLE): on a machine they share with ingest, a burst slows them (they catch
    # up from the stream), not the sensors' answers. Off: they compete with ingest as equals.
    background_cpu: bool = True
    actor_num_cpus: float = Field(0.0, ge=0, description="Ray CPUs reserved per processing actor; 0: they mostly "
                                  "wait on I/O, and a reservation per shard would cap the shard count per node")


class RaySettings(Section):
    # Unset: `lap up` starts a local Ray. Set (e.g. "auto"): join that cluster.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    # Ray's Prometheus endpoint on this node (`lap up` only), LAP's `ray_lap_*` metrics among Ray's own;
    # a cluster sets it with `ray start --metrics-export-port`
    metrics_port: int = Field(8090, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    # Serve's high-throughput mode: HAProxy in front of the replicas, each replica its own HTTP server
    # (docs/decisions.md, "Ingest"). `lap up` applies it; a cluster sets it in cluster.yaml.
    throughput_mode: bool = True
    # Ports throughput mode opens besides http_port (docs/operators.md, "Ports"). Ray binds HAProxy's stats and metrics
    # ports on every interface, whatever http_host says: keep them closed to the outside (firewall, security group).
    haproxy_stats_port: int = Field(8404, ge=1, le=65535)
    haproxy_metrics_port: int = Field(9101, ge=1, le=65535)
    # Serve's own proxy, which HAProxy falls back on while no replica is up (127.0.0.1 in local mode)
    fallback_proxy_port: int = Field(8500, ge=1, le=65535)
    serve_config: Path = REPO_DIR / "serve_config.yaml"
    # `lap up` on one machine caps the ingest autoscaling of serve_config.yaml at this many replicas:
    # on 2 cores a third replica only competes for the same cores (docs/decisions.md)
    local_ingest_replicas: int = Field(2, ge=1)
    ready_timeout_s: float = Field(180.0, gt=0)


class LocalSettings(Section):
    host: Literal["127.0.0.1"] = "127.0.0.1"
    postgres_port: int = Field(5433, ge=1, le=65535)
    kinesis_port: int = Field(4567, ge=1, le=65535)
    s3_port: int = Field(4568, ge=1, le=65535)
    opensearch_port: int = Field(9200, ge=1, le=65535)
    # OpenSearch's node-to-node port: a single node only binds it (on 127.0.0.1)
    opensearch_transport_port: int = Field(9300, ge=1, le=65535)
    # Where `make` installed kinesalite and s3rver (node_modules inside it).
    node_dir: Path = PACKAGE_DIR / "local" / "node"
    # Postgres and OpenSearch refuse to run as root: as root, they run as these users.
    postgres_os_user: str = "nobody"
    opensearch_os_user: str = "nobody"
    # Where `make` unpacked OpenSearch's distribution (it runs on the `java` on PATH, or JAVA_HOME's).
    opensearch_home: Path = PACKAGE_DIR / "local" / "opensearch" / "engine" / OPENSEARCH_VERSION
    # OpenSearch's JVM heap (-Xms = -Xmx). Its memory is about the heap plus half of it for network buffers;
    # 1 GiB holds LAP's local index well on a 2-core box and leaves the page cache the rest.
    opensearch_heap_mb: int = Field(1024, ge=256, le=31744)
    start_timeout_s: float = Field(60.0, gt=0)
    # A stand-in that dies is restarted, at most this many times in 5 minutes.
    max_restarts: int = Field(5, ge=0)


_config_file: ContextVar[Path | None] = ContextVar("lap_config_file", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAP_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    mode: Literal["local", "aws"] = "local"
    data_dir: Path = Path(".lap")
    aws: AwsSettings = AwsSettings()
    stream: StreamSettings = StreamSettings()
    archive: ArchiveSettings = ArchiveSettings()
    index: IndexSettings = IndexSettings()
    db: DbSettings = DbSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    caliper: CaliperSettings = CaliperSettings()
    process: ProcessSettings = ProcessSettings()
    retention: RetentionSettings = RetentionSettings()
    ray: RaySettings = RaySettings()
    local: LocalSettings = LocalSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _fill_endpoints(self) -> "Settings":
        if self.index.retention_days is not None:  # the setting's old place
            if self.retention.index_days is None:
                self.retention.index_days = self.index.retention_days
            self.index.retention_days = None
            warnings.warn("index.retention_days is now retention.index_days; move it in your settings",
                          FutureWarning, stacklevel=2)
        archive_days = self.retention.archive_days
        if archive_days and archive_days * 86400 <= self.process.dedup_window_s:
            raise ValueError(f"retention.archive_days ({archive_days:g}) must be longer than process.dedup_window_s "
                             f"({self.process.dedup_window_s / 86400:g} days): reconcile and replay read the archive "
                             "within it")
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.mode == "aws":
            missing = [name for name, value in (("LAP_DB__DSN", self.db.dsn), ("LAP_INDEX__URL", self.index.url)) if not value]
            if missing:
                raise ValueError(f"mode 'aws' needs {' and '.join(missing)} (or the same keys in the --config file)")
            return self
        local = self.local
        if self.retention.index_days is None:
            self.retention.index_days = LOCAL_INDEX_RETENTION_DAYS
        self.stream.endpoint_url = self.stream.endpoint_url or local_url(local.kinesis_port)
        self.archive.endpoint_url = self.archive.endpoint_url or local_url(local.s3_port)
        self.index.url = self.index.url or local_url(local.opensearch_port)
        if self.db.dsn is None:
            self.db.dsn = SecretStr(
                f"postgresql://{LOCAL_DB_USER}:{LOCAL_DB_PASSWORD}@{local.host}:{local.postgres_port}/{LOCAL_DB_NAME}"
            )
        return self

    # --- derived values used in several places -------------------------------

    def index_cutoff(self, now: datetime | None = None) -> datetime | None:
        """Events received before this are past the index's retention (None: the index keeps everything)."""
        days = self.retention.index_days
        if not days:
            return None
        return (now or datetime.now(timezone.utc)) - timedelta(days=days)

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.ray.http_host in ("0.0.0.0", "::") else self.ray.http_host
        return f"http://{host}:{self.ray.http_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.ray.dashboard_host}:{self.ray.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ray.metrics_port}/metrics"

    def local_services(self) -> list[str]:
        """The stand-ins `lap up` must start: those whose endpoint is the local default."""
        if self.mode != "local":
            return []
        local = self.local
        wanted = {
            "postgres": self.db.dsn is not None
            and f"@{local.host}:{local.postgres_port}/" in self.db.dsn.get_secret_value(),
            "kinesis": self.stream.endpoint_url == local_url(local.kinesis_port),
            "s3": self.archive.endpoint_url == local_url(local.s3_port),
            "opensearch": self.index.url == local_url(local.opensearch_port),
        }
        return [name for name, start in wanted.items() if start]

    def aws_client_kwargs(self, endpoint_url: str | None) -> dict[str, Any]:
        """Keyword arguments for an aiobotocore client of this deployment."""
        kwargs: dict[str, Any] = {"region_name": self.aws.region}
        if endpoint_url:
            kwargs["endpoint_url"] = endpoint_url
        if self.aws.access_key_id is not None and self.aws.secret_access_key is not None:
            kwargs["aws_access_key_id"] = self.aws.access_key_id.get_secret_value()
            kwargs["aws_secret_access_key"] = self.aws.secret_access_key.get_secret_value()
        elif self.mode == "local" and endpoint_url and endpoint_url.startswith("http://127.0.0.1:"):
            # The stand-ins' fixed keys; a service pointed elsewhere keeps the default AWS chain.
            kwargs["aws_access_key_id"] = kwargs["aws_secret_access_key"] = LOCAL_AWS_KEY
        return kwargs


def local_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


class ConfigError(Exception):
    """A settings problem, reported to the user as one clear message."""


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, the YAML file (argument or LAP_CONFIG) and overrides."""
    from pydantic import ValidationError

    path = config_file or os.environ.get("LAP_CONFIG") or None
    if path is not None:
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        where = f" (config file {path})" if path else ""
        lines = [f"invalid settings{where}:"]
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"]) or "settings"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read settings from {path}: {exc}") from None
    finally:
        _config_file.reset(token)
