"""Child processes of `lap up`: start, wait until ready, restart, stop.

Each stand-in runs in its own session, so a Ctrl-C in the terminal reaches
`lap up` only, which then stops everything in order. Each child also gets a
parent-death signal, so even a `kill -9` of `lap up` leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("lap.local")

_PR_SET_PDEATHSIG = 1


class StandInError(RuntimeError):
    """A stand-in could not be started or did not become ready."""


_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # looked up here: the child must not dlopen
_prctl = _libc.prctl


def _child_setup(death_signal: int, parent_pid: int, background: bool = False) -> Callable[[], None]:
    # Runs in the forked child after Popen has changed the user (user=/group=), which
    # matters: a credential change would clear the death signal.
    def setup() -> None:
        _prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        if background:  # before exec, while the child has one thread: every thread of the program inherits it
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return setup


def os_user_ids(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StandInError(f"system user {name!r} does not exist (settings local.postgres_os_user and "
                           "local.opensearch_os_user)") from None
    return entry.pw_uid, entry.pw_gid


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """One supervised child: a command, its log file, and a readiness probe."""

    name: str
    argv: list[str]
    port: int
    log_file: Path
    ready: Callable[[], bool]
    stop_signal: int = signal.SIGTERM
    run_as: str | None = None  # a system user name, used only when we are root
    env: dict[str, str] | None = None
    max_restarts: int = 5
    background: bool = False  # background CPU work (SCHED_IDLE): a stand-in the processing side uses
    proc: subprocess.Popen | None = None
    restarts: deque = field(default_factory=deque)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float) -> None:
        if port_is_open("127.0.0.1", self.port):
            raise StandInError(
                f"{self.name}: port {self.port} on 127.0.0.1 is already in use. "
                f"Stop whatever listens there, or choose another port (docs/operators.md, 'Settings')."
            )
        ids: dict = {}
        if self.run_as and os.geteuid() == 0:
            uid, gid = os_user_ids(self.run_as)
            ids = {"user": uid, "group": gid, "extra_groups": []}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group (a Ctrl-C in the terminal reaches only `lap up`, which stops everything
                # in order), but the supervisor's session: where the kernel shares CPU between sessions first
                # (autogroups), all of LAP is one session, inside which background work yields to the rest.
                process_group=0,
                preexec_fn=_child_setup(self.stop_signal, os.getpid(), self.background),
                env={**os.environ, **(self.env or {})},
                **ids,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise StandInError(
                    f"{self.name} exited with code {self.proc.returncode} while starting; see {self.log_file}"
                )
            if port_is_open("127.0.0.1", self.port) and self._probe():
                log.info("%s ready on 127.0.0.1:%d (pid %d)", self.name, self.port, self.pid)
                return
            time.sleep(0.1)
        self.stop()
        raise StandInError(f"{self.name} was not ready within {timeout:.0f} s; see {self.log_file}")

    def _probe(self) -> bool:
        try:
            return self.ready()
        except Exception:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart_if_dead(self, timeout: float) -> bool:
        """Restart a child that died. False once it has died too often to go on."""
        if self.alive():
            return True
        code = self.proc.returncode if self.proc else None
        if self.proc is not None:
            self._kill_group(self.proc.pid)  # what it left behind (Postgres backends) must not hold the port
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > 300:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            log.error("%s died (code %s) %d times in 5 minutes; giving up", self.name, code, len(self.restarts))
            return False
        self.restarts.append(now)
        log.warning("%s is down (code %s); restarting", self.name, code)
        try:
            self.start(timeout)
        except StandInError as exc:  # counted against the budget; tried again on the next check
            log.error("%s", exc)
        return True

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, self.stop_signal)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
            self._kill_group(proc.pid)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) survived SIGKILL", self.name, proc.pid)
        except ProcessLookupError:
            pass
        # Helpers a child started in its session (none today) go with it.
        self._kill_group(proc.pid)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
