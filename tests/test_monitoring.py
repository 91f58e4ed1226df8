"""Watching a live daemon: /metrics scraped and parsed as Prometheus does, /healthz and /readyz as probes
ask, the live view in a real browser, and mmfuse-tap as a consumer."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from mmfuse.daemon.monitor import Monitor
from mmfuse.daemon.web import MAX_REQUESTS, WebServer
from mmfuse.metrics import DecisionMetrics, sensor_families
from test_end_to_end import SENSORS, WINDOW, Lab, collect, message

OUT = Path(__file__).resolve().parents[1] / "out"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's own parser: (sample name, sorted labels) -> value."""
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, l), v in samples.items() if n == name and labels.items() <= dict(l).items())


def decision(session="s", window=0, restored=(), latency_ms=12.0, revision=0):
    return {"session": session, "window": {"id": window, "revision": revision, "start": 0.0, "end": 1.0},
            "label": "positive", "scores": {"positive": 0.8, "negative": 0.2}, "restored": list(restored),
            "dropped": list(restored), "latency_ms": latency_ms, "published_at": time.time()}


def test_counters_served_never_go_back_when_an_actor_restarts():
    monitor = Monitor("bundle-x")
    first, second = DecisionMetrics(), DecisionMetrics()
    for k in range(5):
        first.count(decision(window=k, restored=["visual"] if k % 2 else []))
    monitor.take([("publisher", "metrics", ("life-1", first.read()))])
    second.count(decision(window=5))
    monitor.take([("publisher", "metrics", ("life-2", second.read()))])  # a new life counts from zero
    ingest = {"accepted": 7, "rejected": {"msgpack": 2}, "unsupported": {}, "seq_gaps": 1}
    monitor.take([("sensor-cam0", "metrics", ("s-1", sensor_families("cam0", ingest, True)))])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in monitor.collect() for s in family.samples}
    assert total(samples, "mmfuse_windows_total") == 6
    assert total(samples, "mmfuse_windows_total", outcome="restored") == 2
    assert total(samples, "mmfuse_decision_latency_seconds_count") == 6
    assert total(samples, "mmfuse_messages_total", sensor="cam0", result="msgpack") == 2
    assert total(samples, "mmfuse_build_info", bundle="bundle-x") == 1


def test_probes_and_page_answer_while_the_daemon_starts():
    monitor = Monitor("bundle-x")
    port = free_port()
    server = WebServer(monitor, "127.0.0.1", port)
    assert server.start() is None
    try:
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/healthz")[0] == 200
        status, body = get(f"{base}/readyz")
        assert status == 503 and json.loads(body)["not_ready"] == {"daemon": "starting"}
        status, page = get(f"{base}/")
        assert status == 200 and "EventSource" in page and "http://" not in page.replace(
            "http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere
        assert ("mmfuse_build_info", (("bundle", "bundle-x"), ("version", "0.1.0"))) in scrape(base)
        taken = WebServer(Monitor("bundle-y"), "127.0.0.1", port).start()
        assert "http.port" in taken
    finally:
        server.stop()


class Watched(Lab):
    """A Lab whose daemon serves HTTP; records what /readyz said before the daemon was ready."""

    def __init__(self, directory, bundle_dir):
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        super().__init__(directory, bundle_dir, {"method": "mean"},
                         http={"host": "127.0.0.1", "port": self.http_port})
        self.config_path = directory / "lab.yaml"
        self.early: list[tuple[int, dict]] = []
        deadline = time.monotonic() + 120
        while not self.daemon.ready.is_set() and time.monotonic() < deadline:
            try:
                status, body = get(f"{self.base}/readyz")
                self.early.append((status, json.loads(body)))
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.1)


@pytest.fixture(scope="module")
def watched(tmp_path_factory, bundle_dir):
    lab = Watched(tmp_path_factory.mktemp("watched"), bundle_dir)
    try:
        lab.wait_ready()
        yield lab
    finally:
        lab.close()


def send_sessions(lab, sessions, windows, stops=None, malformed=0, rng=None):
    """Each session's sensors send one message per window in real time, then `end`; `stops` (session, sensor,
    after window) goes silent instead. Returns the data messages sent per sensor."""
    rng = rng or np.random.default_rng(0)
    seq = {(s, n): 0 for s in sessions for n in SENSORS}
    start = time.monotonic()
    for k in range(windows):
        time.sleep(max(0.0, start + (k + 1) * WINDOW - time.monotonic()))
        for session in sessions:
            for name in SENSORS:
                if stops and stops[:2] == (session, name) and k > stops[2]:
                    continue
                lab.sockets[name].send_multipart(message(session, name, seq[session, name], k * WINDOW, rng=rng))
                seq[session, name] += 1
        if k == 2:
            for i in range(malformed):
                lab.sockets["mic0"].send_multipart([b"audio/" + sessions[0].encode(), b"\xc1 not msgpack %d" % i])
    for session in sessions:
        for name in SENSORS:
            if not (stops and stops[:2] == (session, name)):
                lab.sockets[name].send_multipart(message(session, name, seq[session, name], windows * WINDOW, "end"))
    return {name: sum(n for (s, m), n in seq.items() if m == name) for name in SENSORS}


def test_readyz_is_503_until_the_sensors_are_open_then_200(watched):
    assert watched.early, "the HTTP endpoint never answered while the daemon started"
    status, body = watched.early[0]
    assert status == 503 and not body["ready"] and body["not_ready"]
    deadline = time.monotonic() + 15
    while (answer := get(f"{watched.base}/readyz"))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer[0] == 200, answer
    assert json.loads(answer[1]) == {"ready": True, "not_ready": {}}
    assert get(f"{watched.base}/healthz")[0] == 200


def test_metrics_count_the_decisions_received_and_the_rejects_sent_and_tap_prints_them(watched):
    # SIGINT at its default, as from a terminal: a test run started in the background inherits it ignored
    tap = subprocess.Popen([str(Path(sys.executable).parent / "mmfuse-tap"), "--config", str(watched.config_path),
                            "--json", "--duration-s", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "listening on" in tap.stderr.readline()
    assert "connected to" in tap.stderr.readline()
    time.sleep(0.2)  # its subscription, sent on connecting, reaches the publisher
    malformed = 7
    sent = send_sessions(watched, ["gamma", "delta"], windows=6, malformed=malformed)
    received = collect(watched.decisions, quiet_s=3.0, expect=10)
    assert len(received) >= 10 and {d["session"] for d in received} == {"gamma", "delta"}
    deadline = time.monotonic() + 15
    while total(samples := scrape(watched.base), "mmfuse_windows_total") < len(received) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert total(samples, "mmfuse_windows_total") == len(received)
    restored = sum(1 for d in received if d["restored"] and not d["window"]["revision"])
    assert total(samples, "mmfuse_windows_total", outcome="restored") == restored
    assert total(samples, "mmfuse_decision_latency_seconds_count") == len(received)
    rejected = total(samples, "mmfuse_messages_total", sensor="mic0") \
        - total(samples, "mmfuse_messages_total", sensor="mic0", result="accepted")
    assert rejected == malformed
    for name, count in sent.items():  # every data message and the two ends
        assert total(samples, "mmfuse_messages_total", sensor=name, result="accepted") == count + 2
    assert total(samples, "mmfuse_actor_restarts_total") == 0
    assert total(samples, "mmfuse_sensor_up") == len(SENSORS)
    assert ("mmfuse_streams", (("state", "live"),)) in samples

    tap.send_signal(signal.SIGINT)
    out, err = tap.communicate(timeout=30)
    printed = [json.loads(line) for line in out.splitlines()]
    assert sorted((d["session"], d["window"]["id"]) for d in printed) == \
        sorted((d["session"], d["window"]["id"]) for d in received), err


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_live_view_in_a_browser_shows_the_sessions_the_stopped_sensor_and_decisions(watched):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras")
    long_name = "participant-" + "x" * 244  # a name as long as the wire allows, with nowhere to wrap
    sending = threading.Thread(target=send_sessions, args=(watched, ["north", "south", long_name], 24,
                                                           ("south", "mic0", 3)), daemon=True)
    OUT.mkdir(exist_ok=True)
    shot = OUT / "live_view.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(f"{watched.base}/")
            sending.start()  # once the page is up: north must still be sending when its card is read (12 s)
            page.wait_for_selector('[data-session="north"] tr.decision', timeout=20_000)
            page.wait_for_selector('[data-session="south"] [data-source="mic0"][data-state="down"]', timeout=20_000)
            page.wait_for_selector('[data-session="south"] tr.decision', timeout=20_000)
            assert page.locator('[data-session="north"] [data-source="mic0"]').get_attribute("data-state") == "up"
            assert page.locator("#readiness").inner_text() == "ready"
            page.wait_for_selector(f'[data-session="{long_name}"] tr.decision', timeout=20_000)
            overflowing = page.evaluate("[...document.querySelectorAll('.session')]"
                                        ".filter(card => card.scrollWidth > card.clientWidth).length")
            assert overflowing == 0  # a long name is cut short in its card, shown whole on hover
            time.sleep(2.0)  # a few more decisions and plot points
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    sending.join(timeout=30)
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (760, 1280)
    assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank


def test_the_memory_of_a_process_tree_counts_its_children_and_shared_pages_once_in_pss():
    from mmfuse.daemon.main import tree_memory_mb

    alone = tree_memory_mb()
    children = [subprocess.Popen([sys.executable, "-c", "import numpy, sys; print('loaded', flush=True); sys.stdin.read()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:  # both have loaded python and numpy: the same library pages, mapped by three processes
            assert child.stdout.readline() == "loaded\n"
        child = tree_memory_mb(children[0].pid)
        tree = tree_memory_mb()
        assert child["rss_mb"] > 0 and tree["rss_mb"] >= alone["rss_mb"] + 2 * child["rss_mb"] * 0.9
        assert 0 < tree["pss_mb"] < tree["rss_mb"]
    finally:
        for process in children:
            process.kill()
            process.wait()


def test_http_holds_a_bounded_number_of_connections_and_closes_those_that_never_ask():
    """Each connection is a descriptor of the daemon's driver: clients that connect and send nothing must not
    be able to take them all (and with them the driver's ZeroMQ and Ray sockets)."""
    import socket

    port = free_port()
    server = WebServer(Monitor("bundle-x"), "127.0.0.1", port, max_connections=8, max_streams=2, idle_s=1.0)
    assert server.start() is None
    silent = []
    try:
        for _ in range(8):
            silent.append(socket.create_connection(("127.0.0.1", port)))
            silent[-1].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            assert extra.recv(1) == b""  # closed at once
        except ConnectionResetError:
            pass
        extra.close()
        assert server.refused.counts["connections"] >= 1
        for s in silent:  # the silent ones are closed after idle_s
            s.settimeout(10)
            assert s.recv(1) == b""
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        streams = [urllib.request.urlopen(f"http://127.0.0.1:{port}/events", timeout=5) for _ in range(2)]
        assert get(f"http://127.0.0.1:{port}/events")[0] == 503  # live views have a cap of their own
        time.sleep(1.5)  # and outlive idle_s
        assert all(stream.readline().startswith(b"data: ") for stream in streams)
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        for stream in streams:
            stream.close()
    finally:
        for s in silent:
            s.close()
        server.stop()


def test_http_answers_a_connection_a_bounded_number_of_requests_then_closes_it():
    """Thousands of requests pipelined on each connection, answered one after another, would keep the server busy
    and every connection taken for minutes."""
    port = free_port()
    server = WebServer(Monitor("bundle-x"), "127.0.0.1", port)
    assert server.start() is None
    client = unread_requests(port, b"/healthz", 1000)
    try:
        client.setblocking(True)
        client.settimeout(5.0)
        answers = b""
        with contextlib.suppress(ConnectionResetError):  # (closed with requests unread: a reset)
            while chunk := client.recv(65536):  # until the server closes it
                answers += chunk
        assert 0 < answers.count(b"HTTP/1.1 200 OK") <= MAX_REQUESTS == 100  # (a reset may lose the last)
    finally:
        client.close()
        server.stop()


def test_http_closes_a_connection_whose_client_does_not_read_its_answers():
    """Answers that fill the send buffer and stay there: the connection would be held for good."""
    port = free_port()
    server = WebServer(Monitor("bundle-x"), "127.0.0.1", port, max_connections=4, idle_s=1.0, max_requests=1000)
    assert server.start() is None
    clients = []
    try:
        clients = [unread_requests(port, b"/", 1000) for _ in range(4)]  # 12 MB of live-view pages each
        time.sleep(4.0)
        assert server.refused.counts["unread"] == 4
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        for client in clients:
            client.close()
        server.stop()


def unread_requests(port: int, path: bytes, count: int):
    """A connection that pipelines `count` GET requests for `path` (as far as they go) and reads nothing."""
    import socket

    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError, ConnectionResetError):  # (full, or closed by the server already)
        for _ in range(count):
            client.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return client


def test_a_failing_step_of_the_daemons_watch_is_logged_once_in_full_and_named_by_readyz_until_it_recovers():
    from mmfuse.daemon.main import WatchSteps

    class Log:
        def __init__(self):
            self.lines = []

        def exception(self, event, **fields):
            self.lines.append(("traceback", fields["count"]))

        def error(self, event, **fields):
            self.lines.append(("line", fields["count"]))

    class Supervisor:
        actors = {}

    monitor, log = Monitor("bundle-x"), Log()
    monitor.attach(Supervisor())
    steps, fail = WatchSteps(monitor, log), [True]

    def watch():
        if fail[0]:
            raise OSError(24, "Too many open files")

    for _ in range(12):
        steps.run("supervision", watch)
        steps.run("metrics", lambda: None)  # the other steps go on
    assert log.lines[0] == ("traceback", 1) and all(kind == "line" for kind, _ in log.lines[1:])
    assert len(log.lines) == 10  # the 1st to 10th, then every 10th: the 20th
    assert list(monitor.not_ready()) == ["watch: supervision"] and "Too many open files" in monitor.not_ready()[
        "watch: supervision"]
    fail[0] = False
    steps.run("supervision", watch)
    assert monitor.not_ready() == {}
