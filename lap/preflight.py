"""`lap preflight`: is this deployment ready for traffic? One line per check, a non-zero exit on any failure.

Run on the head after `ray up` and before the load balancer sends traffic
(docs/operations.md, "Deploy"). It reads the same settings as LAP and checks
what a first deploy gets wrong: placeholders left in, IAM policies that deny a
call LAP makes, a secret without its keys, a resource that cannot be reached or
is short of storage, a target group that does not match. In local mode the AWS
checks are skipped and the stand-ins are checked the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import yaml

from lap.settings import OPENSEARCH_VERSION, ConfigError, Settings, load_settings

# The example values of cluster.yaml, deploy/*.json and deploy/lap-aws.yaml: a deployment that still holds one
# would talk to someone else's account, or to nothing (tests/test_deploy_config.py uses the same list).
PLACEHOLDERS: dict[str, str] = {
    r"123456789012": "the example AWS account id",
    r"0123456789abcdef": "an example resource id (AMI, security group, target group or domain)",
    r"0fedcba9876543210": "the example security group id",
    r"subnet-0([a-d])\1{15}": "an example subnet id",
    r"198\.51\.100\.0/24": "the example admin network",
}

SECRET_KEYS = ("dsn", "index_password", "ray_token")  # what lap_secrets in cluster.yaml exports
MIN_FREE_FRACTION = 0.2  # below this, a check of free storage fails: growth needs time to act
# Major versions of OpenSearch whose APIs LAP's index uses (composable templates, create-only bulk, delete by
# query, scroll) as tested: the local engine is OPENSEARCH_VERSION
SUPPORTED_OPENSEARCH = ("2",)


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str


def find_placeholders(text: str) -> list[str]:
    """The placeholders in `text`, each with what it stands for."""
    found = []
    for pattern, meaning in PLACEHOLDERS.items():
        for match in re.finditer(pattern, text):
            found.append(f"{match.group(0)} ({meaning})")
    return found


class Preflight:
    def __init__(self, config_file: Path | None, secret_id: str | None, target_group: str | None,
                 node_role: str | None, timeout_s: float = 10.0):
        self.config_file = config_file
        self.secret_id = secret_id
        self.target_group = target_group
        self.node_role = node_role
        self.timeout_s = timeout_s
        self.settings: Settings | None = None
        self.checks: list[Check] = []

    async def run(self, report: Callable[[Check], None]) -> bool:
        """Runs every check in order, reporting each as it ends; True when none failed."""
        steps: list[tuple[str, Callable[[], Awaitable[tuple[str, str]]]]] = [
            ("settings", self.check_settings),
            ("placeholders", self.check_placeholders),
            ("secret", self.check_secret),
            ("iam", self.check_iam),
            ("kinesis", self.check_kinesis),
            ("s3", self.check_s3),
            ("retention", self.check_retention),
            ("postgres", self.check_postgres),
            ("opensearch", self.check_opensearch),
            ("load balancer", self.check_target_group),
        ]
        for name, step in steps:
            blocked = self._blocked(name)
            if blocked:
                check = Check(name, "skip", blocked)
            else:
                try:
                    status, detail = await asyncio.wait_for(step(), self.timeout_s * 3)
                except asyncio.TimeoutError:
                    status, detail = "FAIL", f"no answer within {self.timeout_s * 3:.0f} s"
                except Exception as exc:  # a check's failure is its line, never a traceback
                    status, detail = "FAIL", _describe(exc)
                check = Check(name, status, detail)
            self.checks.append(check)
            report(check)
        return not any(c.status == "FAIL" for c in self.checks)

    # --- the checks: each returns (status, detail) -----------------------------------

    async def check_settings(self) -> tuple[str, str]:
        try:
            self.settings = load_settings(self.config_file)
        except ConfigError as exc:
            return "FAIL", str(exc).replace("\n", "; ")
        where = os.environ.get("LAP_CONFIG") if self.config_file is None else str(self.config_file)
        return "ok", f"mode {self.settings.mode}" + (f", from {where}" if where else "")

    async def check_placeholders(self) -> tuple[str, str]:
        """Looks at the settings file's values (even when the settings do not load), LAP_ variables and options."""
        values = [v for v in (self.secret_id, self.target_group, self.node_role) if v]
        path = self.config_file or os.environ.get("LAP_CONFIG")
        if path and Path(path).is_file():
            try:
                values.append(json.dumps(yaml.safe_load(Path(path).read_text()), default=str))
            except yaml.YAMLError:
                pass  # the settings check said why
        values += [_without_password(v) for k, v in os.environ.items() if k.startswith("LAP_")]
        if self.settings is not None:
            values.append(json.dumps(self.settings.model_dump(mode="json")))  # secrets dump as "**********"
            if self.settings.db.dsn is not None:
                values.append(_without_password(self.settings.db.dsn.get_secret_value()))
        found = sorted(set(p for v in values for p in find_placeholders(v)))
        if found:
            return "FAIL", "replace " + ", ".join(found)
        return "ok", "none left in the settings file, LAP_ variables and options"

    async def check_secret(self) -> tuple[str, str]:
        if self._local():
            return "skip", "local mode: no secret"
        if not self.secret_id:
            return "FAIL", "pass --secret-id (the Secrets Manager secret of cluster.yaml's lap_secret_id)"
        async with AsyncExitStack() as stack:
            client = await self._aws(stack, "secretsmanager")
            reply = await client.get_secret_value(SecretId=self.secret_id)
        try:
            secret = json.loads(reply["SecretString"])
        except (KeyError, ValueError):
            return "FAIL", f"{self.secret_id} holds no JSON object"
        missing = [k for k in SECRET_KEYS if not isinstance(secret, dict) or not secret.get(k)]
        if missing:
            return "FAIL", f"{self.secret_id} lacks {', '.join(missing)} (needs {', '.join(SECRET_KEYS)})"
        return "ok", f"{self.secret_id} has {', '.join(SECRET_KEYS)}"

    async def check_iam(self) -> tuple[str, str]:
        if self._local():
            return "skip", "local mode: no IAM"
        from lap.sinks.archive import OBJECT_ACTIONS

        s = self.settings
        async with AsyncExitStack() as stack:
            sts = await self._aws(stack, "sts")
            identity = await sts.get_caller_identity()
            account = identity["Account"]
            iam = await self._aws(stack, "iam")
            role_name = self.node_role or _role_name(identity["Arn"])
            role_arn = (await iam.get_role(RoleName=role_name))["Role"]["Arn"]
            region, bucket = s.aws.region, s.archive.bucket
            wanted: list[tuple[str, str]] = [
                (action, f"arn:aws:kinesis:{region}:{account}:stream/{s.stream.name}")
                for action in ("kinesis:DescribeStreamSummary", "kinesis:ListShards", "kinesis:GetShardIterator",
                               "kinesis:GetRecords", "kinesis:PutRecords")]
            wanted.append(("s3:ListBucket", f"arn:aws:s3:::{bucket}"))
            for field, actions in OBJECT_ACTIONS.items():
                key = f"arn:aws:s3:::{bucket}/{getattr(s.archive, field)}/preflight.json"
                wanted += [(action, key) for action in actions]
            if self.secret_id:
                secret = await (await self._aws(stack, "secretsmanager")).describe_secret(SecretId=self.secret_id)
                wanted.append(("secretsmanager:GetSecretValue", secret["ARN"]))
            if self.target_group:
                wanted.append(("elasticloadbalancing:RegisterTargets", self.target_group))
            denied = []
            for action, resource in wanted:
                reply = await iam.simulate_principal_policy(PolicySourceArn=role_arn, ActionNames=[action],
                                                            ResourceArns=[resource])
                if any(r["EvalDecision"] != "allowed" for r in reply["EvaluationResults"]):
                    denied.append(f"{action} on {resource}")
        if denied:
            return "FAIL", f"role {role_name} may not: " + "; ".join(denied)
        return "ok", f"role {role_name} may make all {len(wanted)} calls LAP makes"

    async def check_kinesis(self) -> tuple[str, str]:
        from lap.aws import open_client

        async with AsyncExitStack() as stack:
            kinesis = await open_client(stack, self.settings, "kinesis")
            summary = (await kinesis.describe_stream_summary(StreamName=self.settings.stream.name))[
                "StreamDescriptionSummary"]
        status, shards = summary["StreamStatus"], summary.get("OpenShardCount")
        if status not in ("ACTIVE", "UPDATING"):
            return "FAIL", f"stream {self.settings.stream.name} is {status}"
        return "ok", f"stream {self.settings.stream.name} {status.lower()}, {shards} open shards"

    async def check_s3(self) -> tuple[str, str]:
        from lap.aws import open_client

        bucket = self.settings.archive.bucket
        key = f"{self.settings.archive.prefix}/preflight/{uuid.uuid4().hex}.json"
        async with AsyncExitStack() as stack:
            s3 = await open_client(stack, self.settings, "s3")
            await s3.head_bucket(Bucket=bucket)
            await s3.put_object(Bucket=bucket, Key=key, Body=b"{}", ContentType="application/json")
            try:
                body = await (await s3.get_object(Bucket=bucket, Key=key))["Body"].read()
            finally:
                await s3.delete_object(Bucket=bucket, Key=key)
        if body != b"{}":
            return "FAIL", f"bucket {bucket}: an object read back differs from what was written"
        return "ok", f"bucket {bucket}: an object written, read back and deleted"

    async def check_retention(self) -> tuple[str, str]:
        """The stream's retention and the bucket's lifecycle rules against the `retention` settings: S3 must not
        delete sooner than LAP expects, nor the stream forget sooner than replays may need it."""
        from lap.aws import open_client

        r, a = self.settings.retention, self.settings.archive
        problems, notes = [], []
        async with AsyncExitStack() as stack:
            kinesis = await open_client(stack, self.settings, "kinesis")
            summary = (await kinesis.describe_stream_summary(StreamName=self.settings.stream.name))[
                "StreamDescriptionSummary"]
            hours = summary.get("RetentionPeriodHours", 24)
            if hours != r.stream_hours:
                problems.append(f"the stream keeps records {hours} h, retention.stream_hours says {r.stream_hours}")
            s3 = await open_client(stack, self.settings, "s3")
            try:
                rules = (await s3.get_bucket_lifecycle_configuration(Bucket=a.bucket)).get("Rules", [])
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
                if code != "NoSuchLifecycleConfiguration" and self.settings.mode == "aws":
                    raise
                rules = []
                if code != "NoSuchLifecycleConfiguration":
                    notes.append("lifecycle rules not checked (the local stand-in has none)")
        expiring = {}
        for rule in rules:
            days = (rule.get("Expiration") or {}).get("Days")
            if rule.get("Status") != "Enabled" or days is None:
                continue
            where = rule.get("Filter", {})
            prefix = where.get("Prefix", where.get("And", {}).get("Prefix", rule.get("Prefix", "")))
            for name, ours in (("archive", a.prefix), ("receipts", a.receipts_prefix),
                               ("dedup", a.dedup_prefix), ("dead letters", a.dead_letter_prefix),
                               ("quarantine", a.quarantine_prefix)):
                if ours.startswith(prefix.rstrip("/")) or prefix.startswith(ours):
                    expiring[name] = min(days, expiring.get(name, days))
        wanted = {"archive": r.archive_days, "quarantine": r.quarantine_days}
        for name, days in expiring.items():
            if name not in wanted or wanted[name] is None:
                problems.append(f"a lifecycle rule expires {name} objects after {days} days; LAP keeps them "
                                f"{'for good' if name in wanted else 'itself'} (docs/retention.md)")
            elif days < wanted[name]:
                problems.append(f"a lifecycle rule expires {name} objects after {days} days, before "
                                f"retention.{name}_days ({wanted[name]:g})")
        if problems:
            return "FAIL", "; ".join(problems)
        return "ok", "; ".join([f"stream keeps {hours} h", *(f"S3 expires {k} after {v} days"
                                                               for k, v in expiring.items()), *notes])

    async def check_postgres(self) -> tuple[str, str]:
        from lap.sinks.store import connect, load_migrations, schema_version

        conn = await connect(self.settings)
        try:
            version = await conn.fetchval("SHOW server_version")
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            schema = await schema_version(conn)
        finally:
            await conn.close()
        latest = load_migrations()[-1].version
        if schema != latest:
            return "FAIL", (f"Postgres {version}: the schema is at migration {schema}, this LAP needs {latest} "
                            "(`lap up` applies migrations)")
        storage, failed = await self._postgres_storage()
        return ("FAIL" if failed else "ok"), f"Postgres {version}, schema up to date, {size / 2**20:,.0f} MiB; {storage}"

    async def check_opensearch(self) -> tuple[str, str]:
        from lap.sinks.index import open_opensearch

        client = open_opensearch(self.settings)
        try:
            info = await client.info()
            stats = await client.nodes.stats(metric="fs")
        finally:
            await client.close()
        disks = [n.get("fs", {}).get("total", {}) for n in stats.get("nodes", {}).values()]
        disks = [(d.get("available_in_bytes", 0), d["total_in_bytes"]) for d in disks if d.get("total_in_bytes")]
        version = info["version"]["number"]
        engine = info["version"].get("distribution", "elasticsearch")
        if engine != "opensearch" or version.split(".")[0] not in SUPPORTED_OPENSEARCH:
            return "FAIL", (f"{engine} {version}: LAP's index needs OpenSearch {' or '.join(SUPPORTED_OPENSEARCH)}.x "
                            f"(tested on {OPENSEARCH_VERSION}); choose that engine version for the domain")
        if not disks:
            return "FAIL", f"OpenSearch {version}: its nodes report no disk"
        free, total = min(disks, key=lambda d: d[0] / d[1])  # the fullest node blocks writes first
        detail = f"OpenSearch {version}, {len(disks)} nodes, the fullest has {_free(free, total)}"
        return ("FAIL" if free < MIN_FREE_FRACTION * total else "ok"), detail

    async def check_target_group(self) -> tuple[str, str]:
        if self._local():
            return "skip", "local mode: no load balancer"
        if not self.target_group:
            return "FAIL", "pass --target-group (the ARN of cluster.yaml's lap_target_group)"
        async with AsyncExitStack() as stack:
            elb = await self._aws(stack, "elbv2")
            group = (await elb.describe_target_groups(TargetGroupArns=[self.target_group]))["TargetGroups"][0]
            health = (await elb.describe_target_health(TargetGroupArn=self.target_group))["TargetHealthDescriptions"]
        problems = []
        if group.get("Port") != self.settings.ray.http_port:
            problems.append(f"its port is {group.get('Port')}, LAP's ray.http_port is {self.settings.ray.http_port}")
        if group.get("HealthCheckPath") != "/-/healthz":
            problems.append(f"its health check path is {group.get('HealthCheckPath')}, Serve's is /-/healthz")
        healthy = sum(1 for t in health if t["TargetHealth"]["State"] == "healthy")
        if problems:
            return "FAIL", "target group " + "; ".join(problems)
        return "ok", f"target group matches; {healthy} of {len(health)} targets healthy"

    # --- helpers ------------------------------------------------------------------------

    def _blocked(self, check: str) -> str | None:
        """Why a check cannot run: no settings, or the endpoint it would call is still a placeholder."""
        if check in ("settings", "placeholders"):
            return None
        if self.settings is None:
            return "the settings do not load"
        s = self.settings
        endpoints = {
            "secret": [self.secret_id],
            "iam": [self.secret_id, self.target_group, self.node_role, s.stream.name, s.archive.bucket],
            "kinesis": [s.stream.name, s.stream.endpoint_url],
            "s3": [s.archive.bucket, s.archive.endpoint_url],
            "retention": [s.stream.name, s.stream.endpoint_url, s.archive.bucket, s.archive.endpoint_url],
            "postgres": [_without_password(s.db.dsn.get_secret_value()) if s.db.dsn else None],
            "opensearch": [s.index.url],
            "load balancer": [self.target_group],
        }[check]
        if any(find_placeholders(value) for value in endpoints if value):
            return "not tried: what it would call is a placeholder"
        return None

    def _local(self) -> bool:
        return self.settings.mode == "local"

    async def _aws(self, stack: AsyncExitStack, service: str) -> Any:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(connect_timeout=5, read_timeout=self.timeout_s, retries={"max_attempts": 2})
        return await stack.enter_async_context(
            get_session().create_client(service, config=config, **self.settings.aws_client_kwargs(None)))

    async def _postgres_storage(self) -> tuple[str, bool]:
        """Free storage of the database: RDS's own figures on AWS, the data folder's disk locally."""
        if self._local():
            usage = shutil.disk_usage(self.settings.data_dir)
            return f"its disk: {_free(usage.free, usage.total)}", usage.free < MIN_FREE_FRACTION * usage.total
        from datetime import datetime, timedelta, timezone

        host = urlsplit(self.settings.db.dsn.get_secret_value()).hostname or ""
        if not host.endswith(".rds.amazonaws.com"):
            return f"free storage not checked ({host} is not an RDS endpoint)", False
        instance = host.split(".")[0]
        async with AsyncExitStack() as stack:
            rds = await self._aws(stack, "rds")
            db = (await rds.describe_db_instances(DBInstanceIdentifier=instance))["DBInstances"][0]
            watch = await self._aws(stack, "cloudwatch")
            now = datetime.now(timezone.utc)
            points = (await watch.get_metric_statistics(
                Namespace="AWS/RDS", MetricName="FreeStorageSpace", StartTime=now - timedelta(minutes=15),
                EndTime=now, Period=300, Statistics=["Minimum"],
                Dimensions=[{"Name": "DBInstanceIdentifier", "Value": instance}]))["Datapoints"]
        total = db["AllocatedStorage"] * 2**30
        growth = db.get("MaxAllocatedStorage")
        notes, failed = [], False
        if not growth:
            notes.append("storage autoscaling is off (set --max-allocated-storage)")
            failed = True
        if points:
            free = min(p["Minimum"] for p in points)
            notes.insert(0, _free(free, total))
            failed = failed or free < MIN_FREE_FRACTION * total
        else:
            notes.insert(0, "no FreeStorageSpace figure in the last 15 minutes")
        if growth:
            notes.append(f"grows to {growth} GiB")
        return f"RDS {instance}: " + ", ".join(notes), failed


def _free(free: float, total: float) -> str:
    return f"{free / 2**30:,.0f} of {total / 2**30:,.0f} GiB free ({free / total:.0%})"


def _role_name(caller_arn: str) -> str:
    """The role of an instance profile's session: arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION."""
    parts = caller_arn.split(":", 5)[-1].split("/")
    if parts[0] != "assumed-role" or len(parts) < 2:
        raise ValueError(f"not running under a role ({caller_arn}): pass --node-role")
    return parts[1]


def _without_password(dsn: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_preflight(config_file: Path | None, secret_id: str | None, target_group: str | None,
                  node_role: str | None, report: Callable[[Check], None]) -> bool:
    return asyncio.run(Preflight(config_file, secret_id, target_group, node_role).run(report))
