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

from mmfuse.bundle import BundleError, load_bundle
from mmfuse.daemon.config import ConfigError, DaemonConfig, load_config
from mmfuse.logs import configure
from mmfuse.media import MEDIA_ENCODINGS

EXIT_CONFIG = 2
EXIT_STARTUP = 3


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


def check(config: DaemonConfig, log) -> int:
    try:
        bundle = load_bundle(config.bundle)
    except BundleError as exc:
        log.warning("bundle not usable yet", problem=str(exc))
        print(f"configuration OK; bundle: {exc}", file=sys.stderr)
        return 0
    try:
        bundle.check_fits(config.modalities, config.restorer.method)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    dims = ", ".join(f"{m} {spec['dim']}-d" for m, spec in bundle.modalities.items())
    media = bundle.manifest.get("media", {}).get("towers", {})
    towers = ("; raw media: " + ", ".join(f"{m} ({', '.join(MEDIA_ENCODINGS[m])})" for m in media) if media
              else "; no raw-media towers")
    print(f"configuration OK: {len(config.sensors)} sensor(s), bundle {bundle.id} ({bundle.task}: "
          f"{', '.join(bundle.labels)}; features {dims}{towers}), restorer {config.restorer.method}",
          file=sys.stderr)
    return 0


class Pipeline:
    """The actors of one daemon, created in dependency order and drained in the same order."""

    def __init__(self, config: DaemonConfig, bundle, log_format: dict, virtual_clock: bool = False):
        import ray

        from mmfuse.actors.aligner import AlignerActor
        from mmfuse.actors.fusion import FusionActor
        from mmfuse.actors.publisher import PublisherActor
        from mmfuse.actors.restorer import RestorerActor
        from mmfuse.actors.sensor import SensorActor

        # One method call at a time per actor: calls from one caller then run in order, and the
        # publisher's ZeroMQ socket is never used from two threads.
        io = {"num_cpus": 0, "max_concurrency": 1}
        bundle_path = str(config.bundle.resolve())
        self.publisher = ray.remote(PublisherActor).options(name="publisher", **io).remote(
            config.output.endpoint, log_format)
        self.fusion = ray.remote(FusionActor).options(name="fusion", num_cpus=0).remote(
            bundle_path, config.restorer.method, self.publisher, log_format)
        restorer = {**config.restorer.model_dump(), "overrides": config.restorer.overrides()}
        self.restorer = ray.remote(RestorerActor).options(
            name="restorer", num_cpus=0, num_gpus=config.restorer.num_gpus).remote(
            bundle_path, restorer, self.fusion, log_format)
        self.aligner = ray.remote(AlignerActor).options(name="aligner", **io).remote(
            sorted(bundle.modalities), {s.name: s.modality for s in config.sensors}, config.window.model_dump(),
            config.drop.model_dump(), config.pipeline.model_dump(), config.clock.model_dump(), self.restorer,
            self.fusion, log_format, virtual_clock)
        self.sensors = [
            ray.remote(SensorActor).options(name=f"sensor-{s.name}", **io).remote(
                s.model_dump(), config.window.model_dump(), config.pipeline.model_dump(), config.clock.model_dump(),
                bundle.modalities[s.modality]["dim"], bundle_path, self.aligner, log_format, virtual_clock)
            for s in config.sensors
        ]

    def start(self) -> list[str]:
        """Wait until every actor is up, then open the sensor sockets; returns the problems found."""
        import ray

        problems = ray.get([self.publisher.ready.remote(), self.fusion.ready.remote(), self.restorer.ready.remote(),
                            self.aligner.ready.remote()])
        problems = [p for p in problems if p]
        if not problems:
            problems = [p for p in ray.get([s.start.remote() for s in self.sensors]) if p]
        return problems

    def stats(self) -> dict:
        import ray

        return {
            "sensors": ray.get([s.stats.remote() for s in self.sensors]),
            "aligner": ray.get(self.aligner.stats.remote()),
            "restorer": ray.get(self.restorer.stats.remote()),
            "fusion": ray.get(self.fusion.stats.remote()),
            "publisher": ray.get(self.publisher.stats.remote()),
        }

    def drain(self) -> dict:
        """Stop reading sensors, close every open window, and wait until all decisions are out."""
        import ray

        sensors = ray.get([s.stop.remote() for s in self.sensors])
        return {"sensors": sensors,
                "aligner": ray.get(self.aligner.drain.remote()),
                "restorer": ray.get(self.restorer.drain.remote()),
                "fusion": ray.get(self.fusion.drain.remote()),
                "publisher": ray.get(self.publisher.drain.remote())}


def tree_rss_mb(pid: int | None = None) -> float:
    """RSS of a process (default this one) and all its children, Ray's processes included, in MiB."""
    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        children = process.children(recursive=True)
    except psutil.Error:
        return 0.0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


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
    if args.check:
        return check(config, log)

    try:
        bundle = load_bundle(config.bundle)
        bundle.check_fits(config.modalities, config.restorer.method)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.monotonic()
    ray.init(address=config.ray.address, num_cpus=config.ray.num_cpus, include_dashboard=False,
             configure_logging=False, log_to_driver=True)
    for signum in (signal.SIGINT, signal.SIGTERM):  # ray.init installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        pipeline = Pipeline(config, bundle, log_format, args.virtual_clock)
        problems = pipeline.start()
        if problems:
            for problem in problems:
                log.error("start-up failed", problem=problem)
            return EXIT_STARTUP
        log.info("daemon ready", bundle=bundle.id, sensors=[s.name for s in config.sensors],
                 output=config.output.endpoint, restorer=config.restorer.method, virtual_clock=args.virtual_clock,
                 startup_s=round(time.monotonic() - started, 2))
        while not stop.wait(config.log.stats_interval_s):
            log.info("stats", **pipeline.stats(), rss_mb=tree_rss_mb())
        log.info("draining")
        final = pipeline.drain()
        log.info("stopped", **final, rss_mb=tree_rss_mb())
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
