"""Which life of an actor answers: Ray restarts a dead actor in a new process, and the
supervisor tells a restart from a slow answer by the incarnation its ping returns."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Incarnation:
    token: str   # unique to this process of the actor
    pid: int
    node: str    # Ray node id: the supervisor watches the pid itself when it is on its own node

    @classmethod
    def here(cls) -> Incarnation:
        import ray

        return cls(f"{os.getpid()}-{time.time_ns()}", os.getpid(), ray.get_runtime_context().get_node_id())
