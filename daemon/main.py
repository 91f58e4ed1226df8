"""`mmfuse-daemon --config lab.yaml`: start the actors, run until SIGINT/SIGTERM, drain, exit 0."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import psutil
import structlog

from mmfuse.config import ConfigError, DaemonConfig, load_config
from mmfuse.logs import Tally, configure
from mmfuse.media import MEDIA_ENCODINGS
from mmfuse.security import SecurityError, daemon_keys

EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_RAY_LOST = 4  # Ray itself died under the daemon: a service manager should start it afresh
EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C); SIGTERM stops with 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-daemon", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML configuration (see config/lab.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and bundle, then exit")
    parser.add_argument("--virtual-clock", action="store_true",
                        help="run on the clock of mmfuse-replay --virtual-clock instead of the wall clock: a replay "
                        "gives the same decisions on every run, whatever the machine's load")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of console text")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level")
    return parser.parse_args(argv)


def check(config: DaemonConfig) -> int:
    """What the daemon checks before it starts, without starting anything: 0 when it would start."""
    from mmfuse.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(config.bundle)
        bundle.check_fits(config.modalities, config.restorer.method)
        bundle.verify()
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    problems = unavailable_resources(config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_STARTUP
    dims = ", ".join(f"{m} {spec['dim']}-d" for m, spec in bundle.modalities.items())
    media = bundle.manifest.get("media", {}).get("towers", {})
    towers = ("; raw media: " + ", ".join(f"{m} ({', '.join(MEDIA_ENCODINGS[m])})" for m in media) if media
              else "; no raw-media towers")
    curve = config.security.curve
    security = "sensors not authenticated" if curve is None else f"CURVE: sensor keys from {curve.authorized_keys}"
    print(f"configuration OK: {len(config.sensors)} sensor(s), bundle {bundle.id} ({bundle.task}: "
          f"{', '.join(bundle.labels)}; features {dims}{towers}), restorer {config.restorer.method}; {security}",
          file=sys.stderr)
    return 0


def unavailable_resources(config: DaemonConfig) -> list[str]:
    """Resources of this machine the configuration asks for and cannot have: endpoints the daemon binds that are
    in use, GPUs an embedded Ray would not find, and a Ray cluster that does not answer. Found in seconds, before
    Ray starts."""
    import zmq

    problems = []
    # in a Ray cluster the endpoints bind on the nodes Ray places their actors on, which say so at start-up
    binds = [] if config.ray.address is not None else [("output.endpoint", config.output.endpoint)] + [
        (f"sensors[{i}].endpoint ({s.name}, bind: true)", s.endpoint) for i, s in enumerate(config.sensors) if s.bind]
    context = zmq.Context.instance()
    for key, endpoint in binds:
        probe = context.socket(zmq.PAIR)
        probe.setsockopt(zmq.LINGER, 0)
        try:
            probe.bind(endpoint)
        except zmq.ZMQError as exc:
            problems.append(f"{key}: cannot bind {endpoint} ({exc}); is another daemon running on it? choose a "
                            f"free port")
        finally:
            probe.close()
    if config.http is not None:
        problem = unavailable_port(config.http.host, config.http.port)
        problems += [f"http: cannot listen on {config.http.host}:{config.http.port} ({problem}); is another "
                     f"daemon running on it? choose a free http.port"] if problem else []
    if config.ray.address is not None:
        problem = unreachable_cluster(config.ray.address)
        problems += [f"ray.address: {problem}; start the cluster (ray start --head on its head node) or correct "
                     f"ray.address"] if problem else []
    asked = gpu_requests(config)
    if asked and config.ray.address is None:  # torch is imported only when GPUs are asked for
        problem = gpu_problem(asked, local_gpus(), "this machine has", "to run on the CPU")
        problems += [problem] if problem else []
    return problems


def unavailable_port(host: str, port: int) -> str | None:
    """Why a TCP port cannot be listened on, or None."""
    import socket

    try:
        with socket.create_server((host, port)):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def unreachable_cluster(address: str, timeout_s: float = 3.0) -> str | None:
    """Why nothing answers at a Ray cluster's address (host:port of its GCS, or ray://host:port of its client
    server), or None; Ray itself would retry for minutes before saying so. `auto` and `local` are Ray's to find."""
    import socket

    if address in ("auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return f"{address} is not host:port (for example 10.0.0.5:6379, or ray://10.0.0.5:10001)"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers at {address} ({exc.strerror or exc})"


def gpu_requests(config: DaemonConfig) -> dict[str, float]:
    """The GPUs the actors ask Ray for, by the configuration key that asks."""
    asked = {f"{key}.num_gpus": getattr(config, key).num_gpus for key in ("restorer", "fusion")
             if getattr(config, key).num_gpus}
    return asked | {f"sensors[{i}].num_gpus": s.num_gpus for i, s in enumerate(config.sensors) if s.num_gpus}


def gpu_problem(asked: dict[str, float], found: float, where: str, fix: str) -> str | None:
    """More GPUs asked for than `found`: Ray would wait for ever to place the actors."""
    if sum(asked.values()) <= found:
        return None
    return (f"{', '.join(asked)}: {sum(asked.values()):g} GPU(s) asked for, {where} {found:g}; set "
            f"{' and '.join(asked)}: 0 {fix}")


def local_gpus() -> int:
    """CUDA devices torch can use here."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cluster_gpu_problem(config: DaemonConfig) -> str | None:
    """A Ray cluster joined (ray.address) with fewer GPUs than the actors ask for: they would wait for ever."""
    import ray

    return gpu_problem(gpu_requests(config), ray.cluster_resources().get("GPU", 0),
                       f"the Ray cluster at {config.ray.address} has", "or add a GPU node")


def tree_memory_mb(pid: int | None = None) -> dict[str, float]:
    """Memory of a process (default this one) and all its children, Ray's processes included, in MiB:
    `rss_mb` sums each process's resident set, so a page shared by several (torch's libraries, loaded by
    every actor that runs a model) counts once per process; `pss_mb` sums their proportional shares, each
    resident page counted once: what the tree holds of the machine's memory."""
    try:
        process = psutil.Process(pid)
        processes = [process, *process.children(recursive=True)]
    except (psutil.Error, OSError):
        return {"rss_mb": 0.0, "pss_mb": 0.0}
    rss = pss = 0
    for each in processes:
        try:
            memory = each.memory_full_info()
        except (psutil.Error, OSError):  # (gone, or no descriptor left to read its /proc files with)
            continue
        rss, pss = rss + memory.rss, pss + memory.pss
    return {"rss_mb": round(rss / 2**20, 1), "pss_mb": round(pss / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log_format = {"format": "json" if args.log_json else config.log.format,
                  "level": args.log_level or config.log.level}
    configure(**log_format)
    log = structlog.get_logger().bind(actor="daemon")
    try:
        keys = daemon_keys(config)
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        return check(config)
    signals = Signals()
    from mmfuse.bundle import BundleError, load_bundle  # torch: after the arguments and the configuration

    if keys is None:
        log.warning("sensors are not authenticated", hint="anyone who reaches a sensor endpoint can publish as "
                    "that sensor; set security.curve (README, Security)")
    try:
        bundle = load_bundle(config.bundle)
        bundle.check_fits(config.modalities, config.restorer.method)
        bundle.verify()
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    problems = unavailable_resources(config)
    if problems:
        for problem in problems:
            log.error("start-up failed", problem=problem)
        return EXIT_STARTUP
    return run(config, bundle, log_format, args.virtual_clock, log, signals)


class WatchSteps:
    """The steps of the daemon's watch, each on its own: one that fails (the machine out of file descriptors, say)
    is logged, its traceback once per kind of failure and then a line now and then with the count, and /readyz
    names it while it keeps failing; the other steps, and the pipeline's actors, go on."""

    def __init__(self, monitor, log):
        self.monitor, self.log = monitor, log
        self.failures = Tally()

    def run(self, step: str, action) -> None:
        try:
            action()
        except Exception as exc:
            kind = f"{step}: {type(exc).__name__}"
            first = kind not in self.failures.counts
            if self.failures.add(kind):
                (self.log.exception if first else self.log.error)(
                    "a step of the daemon's watch failed; the rest goes on", step=step, error=repr(exc),
                    count=self.failures.counts[kind])
            self.monitor.step_failed(step, repr(exc))
        else:
            self.monitor.step_failed(step, None)


class Signals:
    """SIGINT and SIGTERM at any moment. During start-up they abort it: at once, except while ray.init runs (it
    starts Ray's processes; stopping it half-way would leave them behind), where they take effect as soon as it
    returns. Once the daemon is ready they ask it to drain and stop."""

    def __init__(self):
        self.stop = threading.Event()
        self.received: int | None = None
        self.ready = False
        self.deferring = False
        self.install()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.received = self.received or signum
        if self.ready:
            self.stop.set()
        elif not self.deferring:
            raise KeyboardInterrupt

    def after_ray_init(self) -> None:
        self.deferring = False
        self.install()  # ray.init installs handlers of its own
        if self.received is not None:
            raise KeyboardInterrupt

    @property
    def exit_status(self) -> int:
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else 0


def run(config: DaemonConfig, bundle, log_format: dict, virtual_clock: bool, log, signals: Signals) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when ray is imported: every actor's lines, unfolded,
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")  # without "(ActorName pid=...)": ours say who
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # and without colour codes
    # Ray waits this long for the news of an actor's death before failing calls to it, and calls to its
    # restarted incarnation queue behind them: 1 s by default, most of an actor's restart (measured)
    os.environ.setdefault("RAY_timeout_ms_task_wait_for_death_info", "100")
    # Ray keeps an event record of every actor call in its GCS for its state API and dashboard, which the daemon
    # uses neither of: at a few calls per window that grew the GCS by 8 MiB a minute (bench/soak.py) up to its cap
    os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
    # Ray starts its workers, every actor of the pipeline among them, at nice 15: below its own agents, the
    # driver and every other process here, so a sender on the same box keeps a sensor actor and its ZeroMQ I/O
    # thread off the CPU (docs/results.md). A cluster's nodes set it at `ray start` (deploy/)
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    from mmfuse.daemon.monitor import Monitor
    from mmfuse.daemon.supervisor import PING_S, Supervisor, placement_problems

    started = time.monotonic()
    monitor, web = Monitor(bundle.id), None
    runtime_env = {"env_vars": {name: os.environ[name] for name in (
        "RAY_timeout_ms_task_wait_for_death_info", "RAY_task_events_report_interval_ms")}} if config.ray.address else None
    signals.deferring = True
    try:
        if config.http is not None:  # up before Ray, so that probes get an answer (not ready) while it starts
            from mmfuse.daemon.web import WebServer

            web = WebServer(monitor, config.http.host, config.http.port, log=log)
            problem = web.start()
            if problem:
                log.error("start-up failed", problem=problem)
                return EXIT_STARTUP
            log.info("http endpoint up", live_view=f"{web.address}/", metrics=f"{web.address}/metrics")
        try:
            ray.init(address=config.ray.address, num_cpus=config.ray.num_cpus, include_dashboard=False,
                     configure_logging=False, log_to_driver=True, namespace=f"mmfuse-{os.getpid()}-{time.time_ns()}",
                     runtime_env=runtime_env)
        except ConnectionError as exc:
            log.error("start-up failed", problem=f"ray.address {config.ray.address}: {exc}; start the cluster "
                      f"(ray start --head on its head node) or correct ray.address")
            return EXIT_STARTUP
        signals.after_ray_init()
        problems = [problem for _, problem in placement_problems(config, ray.nodes())]
        if not problems and config.ray.address:  # each actor fits somewhere: do their GPUs, all together?
            problems = [p for p in [cluster_gpu_problem(config)] if p]
        if problems:
            for problem in problems:
                log.error("start-up failed", problem=problem)
            return EXIT_STARTUP
        supervisor = Supervisor(config, bundle, log_format, virtual_clock, log)
        problems = supervisor.start()
        if problems:
            for problem in problems:
                log.error("start-up failed", problem=problem)
            return EXIT_STARTUP
        monitor.attach(supervisor)
        signals.ready = True
        if signals.received is not None:
            signals.stop.set()
        log.info("daemon ready", bundle=bundle.id, sensors=[s.name for s in config.sensors],
                 output=supervisor.output_address, restorer=config.restorer.method, virtual_clock=virtual_clock,
                 startup_s=round(time.monotonic() - started, 2), pids=supervisor.pids(), ray_node=supervisor.node)
        next_stats, last_stats, steps = time.monotonic() + config.log.stats_interval_s, None, WatchSteps(monitor, log)

        def log_stats():
            nonlocal last_stats
            stats = supervisor.stats()
            if stats != last_stats:  # a quiet daemon says nothing
                log.info("stats", **stats, **tree_memory_mb())
                last_stats = stats

        while not signals.stop.wait(PING_S):
            steps.run("supervision", supervisor.watch)
            if supervisor.lost:
                drain = supervisor.can_drain
                log.error("giving up", problem=supervisor.lost, open_windows="decided first" if drain else "lost",
                          fix="start the daemon again (a service manager does: deploy/)")
                if drain:
                    monitor.set_phase("draining")
                    log.info("stopped", **supervisor.drain(), **tree_memory_mb())
                return EXIT_RAY_LOST
            steps.run("metrics", monitor.poll)
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + config.log.stats_interval_s
                steps.run("stats", log_stats)
        log.info("draining", signal=signal.Signals(signals.received).name)
        monitor.set_phase("draining")
        final = supervisor.drain()
        log.info("stopped", **final, **tree_memory_mb())
        return signals.exit_status
    finally:
        signals.deferring, signals.ready = True, False  # a second Ctrl-C must not cut Ray's shutdown short
        if web is not None:
            web.stop()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
