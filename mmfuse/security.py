"""CURVE authentication of the sensors that publish to the daemon and of the consumers that read its
decisions: CurveZMQ with a ZAP handler, both by pyzmq (`zmq.auth`), keys in ZeroMQ's certificate format.

The daemon is the CURVE server on every socket it owns, whether it binds or connects; sensors and
consumers are clients and must know the daemon's public key. A peer is refused at the handshake when it
has no key, the wrong server key, or a key not among the authorized ones (counted as `auth_refused`).
Which sensor a frame may speak for is checked per frame, from the key its connection authenticated with
(the frame's ZeroMQ `User-Id`, see mmfuse.ingest)."""

from __future__ import annotations

import logging
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from mmfuse.config import DaemonConfig
from mmfuse.logs import Tally

SENSORS = "sensors"      # ZAP domain of the sensor sockets
CONSUMERS = "consumers"  # ZAP domain of the decision socket
RECORDER = "recorder"    # ZAP domain of mmfuse-record's socket for the messages the daemon accepted
REFUSED_AT_HANDSHAKE = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
REJOIN_S = 0.1  # as libzmq's own reconnect interval
KEYS_NAMED_MAX = 1000  # refused keys each logged at least once; beyond, one line per Tally step as for any refusal
PROTOCOL_ERRORS = {  # why a handshake failed before ZAP was asked; ZeroMQ gives no peer address or key then
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "peer without a CURVE key (mechanism mismatch)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE handshake failed: the peer does not use this daemon's public key",
}


class SecurityError(Exception):
    """A key or key directory that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Certificate:
    public: bytes          # z85, as ZeroMQ's socket options take it
    secret: bytes | None   # None for a public certificate


def read_certificate(path: str | Path, secret: bool = False) -> Certificate:
    """A certificate file (NAME.key, or NAME.key_secret with `secret`), as `mmfuse-keys new` writes them."""
    path = Path(path)
    if not path.is_file():
        raise SecurityError(f"{path}: no such key file; make one with mmfuse-keys new NAME --dir DIR")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: not a ZeroMQ certificate ({exc}); use a file mmfuse-keys new wrote") from None
    if secret and secret_key is None:
        raise SecurityError(f"{path}: holds no secret key; give the NAME.key_secret file of this certificate")
    for kind, key in (("public", public), ("secret", secret_key)):
        if key is not None and not curve_key(key):
            raise SecurityError(f"{path}: its {kind} key ({len(key)} characters) is no CURVE key (40 Z85 "
                                f"characters); use a file mmfuse-keys new wrote")
    mode = path.stat().st_mode
    if secret and mode & stat.S_IROTH:
        raise SecurityError(f"{path}: a secret key that every user of this machine can read (mode "
                            f"{stat.filemode(mode)}); restrict it with: chmod 600 {path}")
    return Certificate(public, secret_key)


def curve_key(key: bytes) -> bool:
    """Whether a key is a CURVE key as certificates hold it: 32 bytes in 40 Z85 characters."""
    from zmq.utils import z85

    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def authorized_keys(directory: str | Path) -> frozenset[bytes]:
    """The public keys of every certificate (*.key) in a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SecurityError(f"{directory}: not a directory of public certificates; make it and put each "
                            f"peer's NAME.key in it (mmfuse-keys new NAME --dir {directory})")
    keys = frozenset(read_certificate(path).public for path in sorted(directory.glob("*.key")) if path.is_file())
    if not keys:
        raise SecurityError(f"{directory}: holds no certificate (NAME.key), so every peer would be refused; "
                            f"add them with mmfuse-keys new NAME --dir {directory}")
    return keys


def server_public_key(secret_key: str | Path) -> bytes:
    """The daemon's public key, for its clients: from NAME.key beside the configured NAME.key_secret when
    there is one (a sensor's machine need not hold the daemon's secret), else from the secret file."""
    path = Path(secret_key)
    public = path.with_suffix(".key")
    return read_certificate(public if path.suffix == ".key_secret" and public.exists() else path).public


@dataclass(frozen=True)
class DaemonKeys:
    """Everything the daemon's sockets need of security.curve, read and checked once at start-up."""
    certificate: Certificate
    sensors: frozenset[bytes]               # authorized sensor keys
    sensor_keys: dict[str, bytes]           # sensor name -> the one key its messages may come from
    consumers: frozenset[bytes] | None      # None: any consumer with a key

    def sender_key(self, sensor: str) -> str | None:
        """The key a sensor's frames must carry as their User-Id (None: any authorized sensor key)."""
        key = self.sensor_keys.get(sensor)
        return None if key is None else key.decode()


def daemon_keys(config: DaemonConfig) -> DaemonKeys | None:
    """The keys of a configuration with security.curve (None without); raises SecurityError naming the key."""
    curve = config.security.curve
    if curve is None:
        return None
    try:
        certificate = read_certificate(curve.secret_key, secret=True)
        sensors = authorized_keys(curve.authorized_keys)
        consumers = None if config.output.authorized_keys is None else authorized_keys(config.output.authorized_keys)
    except SecurityError as exc:
        raise SecurityError(f"security: {exc}") from None
    sensor_keys = {}
    for i, sensor in enumerate(config.sensors):
        if sensor.public_key is None:
            continue
        try:
            key = read_certificate(sensor.public_key).public
        except SecurityError as exc:
            raise SecurityError(f"sensors[{i}].public_key: {exc}") from None
        if key not in sensors:
            raise SecurityError(f"sensors[{i}].public_key: {sensor.public_key} is not among the authorized keys in "
                                f"{curve.authorized_keys}, so {sensor.name} would be refused; copy it there")
        sensor_keys[sensor.name] = key
    return DaemonKeys(certificate, sensors, sensor_keys, consumers)


@dataclass(frozen=True)
class ClientKeys:
    """What a client of the daemon (mmfuse-replay, mmfuse-record's decisions) needs: the daemon's public key and
    the certificate (from --key) to speak with as each sensor and as a consumer."""
    server: bytes
    sensors: dict[str, Certificate]
    consumer: Certificate


def client_keys(config: DaemonConfig, paths: list[str], as_sensors: bool = True) -> ClientKeys | None:
    """The certificates a client passes as --key, matched to the configured sensors when it publishes `as_sensors`:
    a sensor with a public_key speaks with the certificate of that key, the others and the consumer with the first
    (None without security)."""
    curve = config.security.curve
    if curve is None:
        if paths:
            raise SecurityError("--key given, but the configuration has no security.curve: its sensors are not "
                                "authenticated; drop --key or configure security.curve")
        return None
    if not paths:
        raise SecurityError("the configuration authenticates with CURVE (security.curve): give your certificate "
                            "with --key NAME.key_secret (mmfuse-keys new NAME --dir DIR makes one)")
    certificates = [read_certificate(path, secret=True) for path in paths]
    by_key = {c.public: c for c in certificates}
    sensors = {}
    for index, sensor in enumerate(config.sensors if as_sensors else []):
        if sensor.public_key is None:
            sensors[sensor.name] = certificates[0]
            continue
        certificate = by_key.get(read_certificate(sensor.public_key).public)
        if certificate is None:
            raise SecurityError(f"sensors[{index}] ({sensor.name}) takes messages from the key in {sensor.public_key} "
                                f"only; give its secret certificate with --key "
                                f"{Path(sensor.public_key).with_suffix('.key_secret')}")
        sensors[sensor.name] = certificate
    return ClientKeys(server_public_key(curve.secret_key), sensors, certificates[0])


def serve(socket: zmq.Socket, certificate: Certificate, domain: str) -> None:
    """Make a socket a CURVE server whose peers are checked by the ZAP handler of `domain`; before bind/connect."""
    socket.curve_secretkey = certificate.secret
    socket.curve_publickey = certificate.public
    socket.curve_server = True
    socket.zap_domain = domain.encode()


def connect_as(socket: zmq.Socket, certificate: Certificate, server_key: bytes) -> None:
    """Make a socket a CURVE client of the server with public key `server_key`; before bind/connect."""
    socket.curve_secretkey = certificate.secret
    socket.curve_publickey = certificate.public
    socket.curve_serverkey = server_key


class Gatekeeper(ThreadAuthenticator):
    """The process's ZAP handler: lets in the keys admitted to each domain, counts and logs every peer it
    refuses with its key and address, and, through socket monitors, peers refused before ZAP is asked (no
    key, or the wrong server key)."""

    def __init__(self, context: zmq.Context, log):
        super().__init__(context, log=logging.getLogger("mmfuse.zap"))
        self.events = log
        self.keys: dict[str, frozenset[bytes] | None] = {}
        self.refused = Tally()
        self.lock = threading.Lock()
        self._address = ""
        self.watched: list[tuple[zmq.Socket, threading.Thread]] = []  # sockets and the threads reading monitors
        self.stopping = threading.Event()
        self.refused_on: set[int] = set()  # id() of the watched sockets a handshake failed on: see rejoin()
        self.keys_named: set[str] = set()  # refused keys already logged: a keyless peer's retries hide none
        self.rejoined_at: dict[int, float] = {}

    def admit(self, domain: str, keys: frozenset[bytes] | None) -> None:
        """Let in peers with these public keys (z85) on sockets of `domain`; None: any peer with a key."""
        self.keys[domain] = keys
        self.configure_curve_callback(domain, self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"  # for callback() to name it
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        keys = self.keys.get(domain)
        if keys is None or key in keys:
            return True
        self._refuse("key not authorized", domain=domain, key=key.decode(), address=self._address)
        return False

    def watch(self, socket: zmq.Socket, domain: str) -> None:
        """Count the handshakes a CURVE server socket refuses before ZAP is asked; call from the socket's thread."""
        monitor = socket.get_monitor_socket(REFUSED_AT_HANDSHAKE)
        reader = threading.Thread(target=self._read_monitor, args=(monitor, domain, id(socket)), daemon=True,
                                  name=f"handshakes-{domain}")
        self.watched.append((socket, reader))
        reader.start()

    def _read_monitor(self, monitor: zmq.Socket, domain: str, watched: int) -> None:
        while not self.stopping.is_set():
            try:
                if not monitor.poll(100):  # never blocked for long: stop() waits for this thread
                    continue
                event = recv_monitor_message(monitor)
            except zmq.ZMQError:
                break
            if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                break
            self.refused_on.add(watched)
            self._refuse(PROTOCOL_ERRORS.get(event["value"], f"handshake failed (ZMTP error {event['value']:#x})"),
                         domain=domain, endpoint=event["endpoint"].decode("utf-8", "replace"))
        monitor.close(linger=0)  # by its own thread: a ZeroMQ socket is used by one thread at a time

    def rejoin(self, socket: zmq.Socket, endpoint: str) -> None:
        """Connect a connected endpoint again once a peer there failed the handshake: libzmq gives such an
        endpoint up for good (no reconnect after a protocol error), so one impostor, or a sensor started once
        with the wrong server key, would cut the genuine sensor off. Call from the socket's thread; at most
        every REJOIN_S."""
        key = id(socket)
        if key not in self.refused_on or time.monotonic() - self.rejoined_at.get(key, 0.0) < REJOIN_S:
            return
        self.refused_on.discard(key)
        self.rejoined_at[key] = time.monotonic()
        try:
            socket.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # already dropped by libzmq
        socket.connect(endpoint)

    def stop(self) -> None:
        """Stop watching (from the watched sockets' thread, once they are closed or before), then stop ZAP."""
        self.stopping.set()
        for _, reader in self.watched:
            reader.join()  # it closes its monitor socket itself: only then may the context go
        for socket, _ in self.watched:
            if not socket.closed:
                socket.disable_monitor()
        super().stop()

    def _refuse(self, why: str, **fields) -> None:
        with self.lock:
            worth_a_line = self.refused.add("auth_refused")
            key = fields.get("key")
            if key is not None and key not in self.keys_named and len(self.keys_named) < KEYS_NAMED_MAX:
                self.keys_named.add(key)
                worth_a_line = True
        if worth_a_line:
            self.events.warning("peer refused at the handshake", why=why, count=self.refused.counts["auth_refused"],
                                **fields)

    @property
    def refused_count(self) -> int:
        return self.refused.counts.get("auth_refused", 0)
