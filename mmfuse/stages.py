"""Ray handles of the stages an actor hands work on to, by actor name."""

from __future__ import annotations


class StageHandles:
    """Each stage's handle, looked up once (Ray restarts an actor under the same handle). `connect` looks them
    up and calls each once ahead of the first window: an actor's first call to another sets up the connection,
    and that set-up would otherwise fall on the first window of a run, on every hop."""

    def __init__(self):
        self.handles: dict = {}

    def __getitem__(self, name: str):
        if name not in self.handles:
            import ray

            self.handles[name] = ray.get_actor(name)
        return self.handles[name]

    def connect(self, names: list[str]) -> list:
        """A ping to each stage, sent, not waited for (two actors connecting to each other must not wait on
        each other): the calls to keep until they are done."""
        return [self[name].ping.remote() for name in names]
