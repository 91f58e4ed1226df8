"""`mmfuse-tap --config lab.yaml`: watch a running daemon's decisions in the terminal.

It subscribes to output.endpoint like any consumer (with security.curve, give your consumer certificate with
--key) and shows each session's latest decisions and what was restored in them. --json prints one decision
per line instead (the map on the wire, as JSON), for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from mmfuse import wire
from mmfuse.config import ConfigError, load_config
from mmfuse.options import positive, positive_int
from mmfuse.security import SecurityError, client_keys, connect_as

REFRESH_PER_S = 4
SESSIONS_SHOWN = 30
DECISIONS_SHOWN = 12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmfuse-tap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="daemon configuration: its output.endpoint")
    parser.add_argument("--endpoint", help="subscribe here instead of output.endpoint (the daemon's address as "
                        "seen from this machine, when the configuration binds tcp://*:PORT)")
    parser.add_argument("--json", action="store_true", help="print one decision per line as JSON")
    parser.add_argument("--count", type=positive_int, default=None, metavar="N", help="exit after N decisions")
    parser.add_argument("--duration-s", type=positive, default=None, help="exit after this long")
    parser.add_argument("--key", action="append", default=[], metavar="NAME.key_secret",
                        help="with security.curve: the consumer certificate to read decisions with")
    return parser.parse_args(argv)


class Sessions:
    """What the terminal view shows: per session its latest decision and counts, and the latest decisions."""

    def __init__(self):
        self.sessions: dict[str, dict] = {}
        self.latest: deque[dict] = deque(maxlen=DECISIONS_SHOWN)
        self.malformed = 0

    def add(self, decision: dict) -> None:
        session = self.sessions.setdefault(decision["session"], {"decided": 0, "restored": 0})
        session["decided"] += 1
        session["restored"] += bool(decision["restored"])
        session["last"] = decision
        session["at"] = time.time()
        self.latest.appendleft(decision)

    def render(self):
        from rich.console import Group
        from rich.table import Table

        sessions = Table(title="sessions", expand=True, title_justify="left")
        for column in ("session", "windows", "restored", "latest", "score", "restored now", "dropped", "latency"):
            sessions.add_column(column, justify="right" if column in ("windows", "restored", "score", "latency")
                                else "left")
        shown = sorted(self.sessions.items(), key=lambda item: item[1]["at"], reverse=True)[:SESSIONS_SHOWN]
        for name, session in sorted(shown):
            last = session["last"]
            sessions.add_row(name, str(session["decided"]), f"{100 * session['restored'] / session['decided']:.0f} %",
                             _label(last), f"{max(last['scores'].values()):.2f}",
                             ", ".join(last["restored"]) or "-", ", ".join(last["dropped"]) or "-",
                             f"{last['latency_ms']:.0f} ms", style="cyan" if last["restored"] else None)
        latest = Table(title="latest decisions", expand=True, title_justify="left")
        for column in ("session", "window", "label", "restored", "outcome"):
            latest.add_column(column)
        for decision in self.latest:
            latest.add_row(decision["session"], str(decision["window"]["id"]), _label(decision),
                           ", ".join(decision["restored"]) or "-", wire.decision_outcome(decision))
        hidden = len(self.sessions) - len(shown)
        footer = f"{len(self.sessions)} session(s){f', {hidden} not shown' if hidden else ''}" + \
            (f"; {self.malformed} malformed message(s) ignored" if self.malformed else "") + "; Ctrl-C to stop"
        return Group(sessions, latest, footer)


def _label(decision: dict) -> str:
    revision = decision["window"]["revision"]
    return decision["label"] + (" (abstain)" if decision.get("abstain") else "") + \
        (f" (rev {revision})" if revision else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        keys = client_keys(config, args.key, as_sensors=False)
    except (ConfigError, SecurityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    endpoint = args.endpoint or config.output.endpoint
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"decision/")
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        connect_as(socket, keys.consumer, keys.server)
    monitor = socket.get_monitor_socket(CONNECTION_EVENTS)
    try:
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        print(f"error: cannot connect to {endpoint}: {exc}; give the daemon's address with --endpoint",
              file=sys.stderr)
        return 2
    deadline = None if args.duration_s is None else time.monotonic() + args.duration_s
    sessions, received = Sessions(), 0
    live, rendered, connected = None, 0.0, False
    print(f"listening on {endpoint}", file=sys.stderr, flush=True)
    if not args.json:
        from rich.live import Live

        live = Live(sessions.render(), auto_refresh=False)
        live.start()
    try:
        while args.count is None or received < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            while monitor.poll(0):
                connected = _say_connection(recv_monitor_message(monitor)["event"], endpoint, connected)
            if socket.poll(250 if left is None else min(250, 1000 * left)):
                try:
                    decision = wire.decode_decision(socket.recv_multipart())
                except wire.WireError:
                    sessions.malformed += 1
                    continue
                received += 1
                if args.json:
                    print(json.dumps(decision), flush=True)
                    continue
                sessions.add(decision)
            if live is not None and time.monotonic() - rendered >= 1 / REFRESH_PER_S:
                live.update(sessions.render(), refresh=True)
                rendered = time.monotonic()
    except BrokenPipeError:  # --json into a pipe whose reader has gone (| head)
        sys.stderr.close()
    finally:
        if live is not None:
            live.update(sessions.render(), refresh=True)
            live.stop()
        socket.disable_monitor()
        monitor.close()
        socket.close()
    return 0


CONNECTION_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH \
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def _say_connection(event: int, endpoint: str, connected: bool) -> bool:
    """Say on stderr what became of the connection (decisions flow only from 'connected' on); whether it is up."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        said = f"connected to {endpoint}"
    elif event == zmq.EVENT_DISCONNECTED:
        said = f"disconnected from {endpoint}; reconnecting when the daemon is back" if connected else None
    elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        said = f"{endpoint} refused this consumer's key: give one whose certificate is in the daemon's " \
               f"output.authorized_keys with --key"
    else:
        said = f"no handshake with {endpoint}: is it the daemon's output endpoint, with the same security setting?"
    if said:
        print(said, file=sys.stderr, flush=True)
    return event == zmq.EVENT_HANDSHAKE_SUCCEEDED


if __name__ == "__main__":
    sys.exit(main())
