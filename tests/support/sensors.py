"""A sensor for the fault tests: it sends while something is upgraded or lost, and keeps what was acknowledged."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import orjson

from lap.samples import envelope


class Sensor(threading.Thread):
    """Sends envelopes until stopped, each until it is acknowledged, the way a sensor retries a 503 or 429.

    With `retry_any`, it also retries other failures (a replica lost with its node), as sensors do.
    """

    def __init__(self, settings, token: str, events: list[dict], per: int = 10, retry_any: bool = False,
                 pause: float = 0.05):
        super().__init__(daemon=True)
        self.pause = pause
        self.retry_any = retry_any
        self.url = f"{settings.api_url}/caliper"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.envelopes = [events[i:i + per] for i in range(0, len(events), per)]
        self.acknowledged: list[dict] = []
        self.statuses: Counter = Counter()
        self.transport_errors: list[str] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + 300

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            for items in self.envelopes:
                if self.stop.is_set():
                    return
                body = orjson.dumps(envelope(items))
                while time.monotonic() < self.deadline:
                    try:
                        reply = client.post(self.url, content=body, headers=self.headers)
                    except httpx.TransportError as exc:
                        self.transport_errors.append(repr(exc))
                        time.sleep(0.5)
                        continue
                    self.statuses[reply.status_code] += 1
                    if reply.status_code == 200:
                        self.acknowledged += items
                        break
                    if reply.status_code not in (429, 503) and not self.retry_any:
                        return  # a reply a sensor cannot retry: the test fails on it
                    time.sleep(min(float(reply.headers.get("retry-after", "1")), 1.0))
                time.sleep(self.pause)
