"""The Pipeline Serve deployment: brings up the processing actors, so `serve deploy` starts everything.

It has no HTTP route. Its replica creates (or finds) the detached, named
AuditActor, Coordinator and IndexWriter and starts their loops; Serve's health
check pings them, so `serve status` shows the processing side's health. The
actors outlive a redeploy of this deployment: processing goes on through an
upgrade of the APIs.
"""

import asyncio
import logging

import ray
from ray import serve

from lap.audit.actor import AUDIT_ACTOR, NAMESPACE, AuditActor
from lap.process.coordinator import COORDINATOR, Coordinator
from lap.process.index_writer import INDEX_WRITER, IndexWriter
from lap.settings import load_settings

log = logging.getLogger("lap.process")


@serve.deployment  # one replica, no CPU, its health checks: serve_config.yaml
class Pipeline:
    def __init__(self) -> None:
        settings = load_settings()
        options = {"namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
                   "num_cpus": settings.process.actor_num_cpus}
        self.actors = {
            AUDIT_ACTOR: AuditActor.options(name=AUDIT_ACTOR, **options).remote(),
            COORDINATOR: Coordinator.options(name=COORDINATOR, **options).remote(),
        }
        if settings.process.index_enabled:
            self.actors[INDEX_WRITER] = IndexWriter.options(name=INDEX_WRITER, **options).remote()
        # Kept so that Ray, as their owner, re-runs the loops when an actor restarts.
        self.loops = {name: actor.run.remote() for name, actor in self.actors.items()}

    async def check_health(self) -> None:
        for name, loop in list(self.loops.items()):
            ready, _ = ray.wait([loop], timeout=0)
            if ready:  # a loop never ends on its own: start it again (the actor keeps its state)
                try:
                    await loop
                except Exception as exc:
                    log.warning("%s loop ended: %s; starting it again", name, exc)
                self.loops[name] = self.actors[name].run.remote()
        await asyncio.wait_for(self.actors[COORDINATOR].ping.remote(), 30)

