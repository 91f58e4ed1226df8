"""The daemon's configuration (also read by record, replay and `mmfuse-eval --log`): YAML validated by
pydantic, errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmfuse import MAX_NAME_LEN
from mmfuse.options import RESTORERS as RESTORER_NAMES

ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


NUMBERS = (int, float, int | None, float | None)


class ConfigError(Exception):
    """A configuration that cannot be used; the message lists every problem with its fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # (.inf would pass every `gt`)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_for_a_number(cls, value, info):
        """pydantic reads true as 1 for a number; in YAML that is a slip (yes, on) more often than a number."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in NUMBERS:
            raise ValueError(f"a number is needed here, not {str(value).lower()}: write one such as 2.0")
        return value


def _check_endpoint(value: str) -> str:
    if not value.startswith(ENDPOINT_SCHEMES):
        raise ValueError(f"endpoint must start with one of {', '.join(ENDPOINT_SCHEMES)}, "
                         f"for example tcp://127.0.0.1:5551")
    if value.startswith("tcp://"):
        host, _, port = value.removeprefix("tcp://").rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("a tcp endpoint is tcp://HOST:PORT with a port from 1 to 65535, for example "
                             "tcp://127.0.0.1:5551")  # (libzmq would take port 99999 as 34463)
    return value


WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")


def _tcp_place(host: str, port: int, binds: bool) -> tuple[str, int, bool]:
    """(host, port, whether it is surely this machine) of a TCP endpoint, its host normalised."""
    import ipaddress

    host = host.lower()
    host = "127.0.0.1" if host == "localhost" else "*" if host in WILDCARD_HOSTS else host.strip("[]")
    try:
        local = binds or host == "*" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or an interface name
        local = binds
    return host, port, local


def _same_place(a: tuple[str, int, bool], b: tuple[str, int, bool]) -> bool:
    """Whether two TCP endpoints are one port: the same host, or a wildcard and a host of this machine."""
    return a[1] == b[1] and (a[0] == b[0] or ("*" in (a[0], b[0]) and a[2] and b[2]))


RAY_BUILT_IN = ("CPU", "GPU", "memory", "object_store_memory")


def _check_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in RAY_BUILT_IN:
            raise ValueError(f"{name} is one of Ray's own resources; ask for GPUs with num_gpus, and name only "
                             f"custom resources here (those given to `ray start --resources`)")
        if not name or amount <= 0:
            raise ValueError(f"resource {name!r}: {amount}; give each custom resource a name and an amount > 0, "
                             f"for example {{lab_pc_1: 0.01}}")
    return value


RESOURCES_HELP = ("Ray custom resources this actor needs, {NAME: AMOUNT}: it runs only on a node started with them "
                  "(ray start --resources)")


class SensorConfig(Section):
    name: str = Field(min_length=1, max_length=MAX_NAME_LEN,
                      description="sensor id; also the `source` its messages carry (no '/')")
    modality: Literal["audio", "visual", "text"]
    endpoint: str
    bind: bool = Field(False, description="daemon binds this endpoint instead of connecting to it")
    frames_per_window: int = Field(1, ge=1, description="camera frames encoded per window and stream (jpeg, rgb8)")
    public_key: Path | None = Field(None, description="with security.curve: this sensor's public certificate "
                                    "(NAME.key); its messages are accepted from that key only")
    num_gpus: float = Field(0.0, ge=0, description="GPUs this sensor's actor asks Ray for, to run its raw-media "
                            "tower there; 0 runs it on the CPU")
    resources: dict[str, float] = Field(default_factory=dict, description=RESOURCES_HELP)

    _endpoint = field_validator("endpoint")(_check_endpoint)
    _resources = field_validator("resources")(_check_resources)

    @field_validator("name")
    @classmethod
    def _name_as_a_source(cls, value: str) -> str:
        if "/" in value:
            raise ValueError("a sensor's messages carry its name as `source`, which has no '/' on the wire; "
                             "rename it without '/'")
        return value


MIN_WINDOW_S = 0.05  # shorter windows hold too little of any modality to decide on, and cost a decision each
MAX_WINDOW_S = 3600.0
MAX_OVERLAP = 100  # windows a moment belongs to (length_s / hop_s)


class WindowConfig(Section):
    mode: Literal["time", "utterance"] = Field("time", description="time: tumbling or sliding windows of "
                                               "length_s every hop_s; utterance: one window per text segment "
                                               "(its span), windows of length_s while no text source is live")
    length_s: float = Field(2.0, ge=MIN_WINDOW_S, le=MAX_WINDOW_S)
    hop_s: float = Field(2.0, ge=0.01)
    slot_s: float = Field(0.25, ge=0.01, description="utterance windows: the resolution their spans are cut at")
    watermark_bound_s: float = Field(0.0, ge=0, description="how far behind its latest time a source may still "
                                     "send data: windows close this much later")
    allowed_lateness_s: float = Field(0.0, ge=0, description="how long after closing a window still takes late "
                                      "data, each time publishing a corrected decision (`revision` 1, 2, ...); "
                                      "0: late data is counted and dropped")

    @model_validator(mode="after")
    def _hop_within_length(self):
        if self.hop_s > self.length_s:
            raise ValueError(f"hop_s ({self.hop_s}) is longer than length_s ({self.length_s}): data between "
                             "windows would be lost; use hop_s <= length_s")
        if self.length_s > MAX_OVERLAP * self.hop_s:
            raise ValueError(f"length_s / hop_s is {self.length_s / self.hop_s:g}: every message would be summed "
                             f"into that many windows; keep it at most {MAX_OVERLAP} (hop_s >= "
                             f"{self.length_s / MAX_OVERLAP:g})")
        if self.mode == "utterance" and self.allowed_lateness_s:
            raise ValueError("allowed_lateness_s applies to time windows; set it to 0 or use mode: time")
        return self


class DropConfig(Section):
    timeout_s: float = Field(1.0, gt=0, description="a source silent this long counts as dropped")
    period_factor: float = Field(5.0, ge=0, description="a source silent this many of its own learned periods "
                                 "(plus its delay jitter and the flush interval) counts as dropped sooner; "
                                 "0: timeout_s only")
    min_silence_s: float = Field(0.1, ge=0, description="the least of those periods' worth of silence that "
                                 "counts: a fast stream (a 100 Hz sensor) silent for a few ms is the sender's "
                                 "machine busy, not a sensor gone")
    min_share: float = Field(0.0, ge=0, le=1, description="a modality with less than this share of its "
                             "expected frames in a window counts as missing there; 0: off")


class ClockConfig(Section):
    tolerance_s: float = Field(0.1, gt=0, description="a source whose clock agrees with the session's within "
                               "this is taken as synchronised; others are mapped onto the session's clock. "
                               "Keep it above the differences in the sources' delivery delays")
    jump_s: float = Field(1.0, gt=0, description="a change of a source's clock offset larger than this is a "
                          "clock reset or jump (its later times are shifted to continue its timeline)")


class RestorerConfig(Section):
    method: str = Field("autoencoder", description="the restorer of the bundle that fills missing modalities; "
                        "autoencoder measured best on clean data (docs/results.md)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the restorer actor asks Ray for; 0 runs on CPU")
    max_batch: int = Field(64, ge=1, description="most windows restored in one batch")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a window waits for others to batch with")
    steps: int | None = Field(None, ge=1, description="diffusion: sampling steps (default: the bundle's)")
    mode: Literal["ddim", "admc"] | None = Field(None, description="diffusion: sampler (default: the bundle's)")
    samples: int = Field(1, ge=1, description="diffusion: samples averaged per window; > 1 publishes their spread")
    abstain_spread: float | None = Field(None, gt=0, description="diffusion with samples > 1, or retrieval (the "
                                         "spread of its k neighbours): label 'abstain' above this spread")
    abstain_below: float | None = Field(None, gt=0, lt=1, description="label a window 'abstain' when its top "
                                        "calibrated score is below this probability (classification)")
    seed: int = Field(0, description="diffusion: noise seed; with it a replay restores identically")
    resources: dict[str, float] = Field(default_factory=dict, description=RESOURCES_HELP)

    _resources = field_validator("resources")(_check_resources)

    @model_validator(mode="after")
    def _diffusion_options(self):
        if self.method != "diffusion":
            used = [k for k in ("steps", "mode") if getattr(self, k) is not None]
            used += ["samples"] if self.samples != 1 else []
            if used:
                raise ValueError(f"{', '.join(used)} only apply to method diffusion; remove them or set "
                                 f"method: diffusion")
            if self.abstain_spread is not None and self.method != "retrieval":
                raise ValueError(f"abstain_spread needs a restorer that measures a spread (diffusion with "
                                 f"samples >= 2, or retrieval), not {self.method}")
        elif self.abstain_spread is not None and self.samples < 2:
            raise ValueError("abstain_spread needs samples >= 2 (the spread of one sample is zero)")
        return self

    def overrides(self) -> dict:
        """Sampler settings that replace the bundle's."""
        if self.method != "diffusion":
            return {}
        chosen = {"steps": self.steps, "mode": self.mode, "samples": self.samples, "seed": self.seed}
        return {k: v for k, v in chosen.items() if v is not None}

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in RESTORER_NAMES:
            raise ValueError(f"unknown restorer {value!r}; choose one of {', '.join(sorted(RESTORER_NAMES))}")
        return value


class PlacementConfig(Section):
    """Where the aligner, fusion or publisher actor runs."""
    resources: dict[str, float] = Field(default_factory=dict, description=RESOURCES_HELP)

    _resources = field_validator("resources")(_check_resources)


class FusionConfig(PlacementConfig):
    """Where the fusion actor runs, and on what."""
    num_gpus: float = Field(0.0, ge=0, description="GPUs the fusion actor asks Ray for, to run its heads and, "
                            "while the restorer is down, its restoring there; 0 runs on the CPU")


class OutputConfig(Section):
    endpoint: str = "tcp://127.0.0.1:5560"
    authorized_keys: Path | None = Field(None, description="with security.curve: directory of the public "
                                         "certificates of the consumers that may read decisions; empty: any "
                                         "consumer that knows the daemon's public key")

    _endpoint = field_validator("endpoint")(_check_endpoint)


class RecorderConfig(Section):
    endpoint: str = Field(description="where mmfuse-record listens for every message the daemon accepts; the "
                          "daemon's sensor actors connect to it and push each accepted message there")

    _endpoint = field_validator("endpoint")(_check_endpoint)


class CurveConfig(Section):
    secret_key: Path = Field(description="the daemon's certificate, public and secret (NAME.key_secret, "
                             "from mmfuse-keys new)")
    authorized_keys: Path = Field(description="directory of the sensors' public certificates (NAME.key)")


class SecurityConfig(Section):
    curve: CurveConfig | None = Field(None, description="CURVE authentication of sensors and consumers; "
                                      "empty: anyone who reaches an endpoint can publish as a sensor")


class RayConfig(Section):
    address: str | None = Field(None, description="join this Ray cluster; empty starts an embedded local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the embedded Ray; default all")


class PipelineConfig(Section):
    batch_interval_ms: float = Field(10.0, gt=0, le=1000,
                                     description="least time between two batches a sensor actor sends the aligner")
    flush_interval_ms: float = Field(200.0, gt=0, description="most time data waits in a sensor actor when "
                                     "no window is due; keep it below drop.timeout_s")
    gather_ms: float = Field(20.0, ge=0, le=1000, description="most time a batch due at a window end waits for "
                             "the sensor's other streams whose windows end then too, so that the messages ending "
                             "a window in every session go out, and are encoded, together; 0: at once")
    max_payload_bytes: int = Field(8 * 1024 * 1024, gt=0, description="larger sensor messages are rejected")
    session_idle_s: float = Field(60.0, gt=0, description="forget a session silent this long")
    shared_model_process: bool = Field(False, description="run fusion in the restorer's process: one process "
                                       "imports torch instead of two (about 360 MiB less PSS, docs/results.md), but "
                                       "while it restarts no stage stands in and decisions wait for it")

    @property
    def stream_idle_s(self) -> float:
        """How long a sensor keeps a silent stream's state: streams outlive their session's idle time."""
        return 5 * self.session_idle_s


class HttpConfig(Section):
    host: str = Field("127.0.0.1", min_length=1, description="address the HTTP endpoint listens on; 0.0.0.0 for "
                      "every interface (a monitoring stack on another machine)")
    port: int = Field(9464, ge=1, le=65535, description="its port: /metrics, /healthz, /readyz and the live view")


class LogConfig(Section):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval_s: float = Field(10.0, gt=0)


class DaemonConfig(Section):
    bundle: Path
    sensors: list[SensorConfig] = Field(min_length=1)
    window: WindowConfig = WindowConfig()
    drop: DropConfig = DropConfig()
    clock: ClockConfig = ClockConfig()
    aligner: PlacementConfig = PlacementConfig()
    restorer: RestorerConfig = RestorerConfig()
    fusion: FusionConfig = FusionConfig()
    publisher: PlacementConfig = PlacementConfig()
    output: OutputConfig = OutputConfig()
    recorder: RecorderConfig | None = Field(None, description="hand mmfuse-record the messages the daemon "
                                            "accepted; empty: mmfuse-record subscribes to the sensors itself")
    security: SecurityConfig = SecurityConfig()
    ray: RayConfig = RayConfig()
    pipeline: PipelineConfig = PipelineConfig()
    log: LogConfig = LogConfig()
    http: HttpConfig | None = Field(None, description="serve /metrics, /healthz, /readyz and the live view at / "
                                    "over HTTP; absent: off")

    @model_validator(mode="after")
    def _unique_sensors(self):
        names = [s.name for s in self.sensors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sensor names must be unique; {', '.join(duplicates)} appear more than once")
        if self.pipeline.flush_interval_ms >= self.drop.timeout_s * 1000:
            raise ValueError(f"pipeline.flush_interval_ms ({self.pipeline.flush_interval_ms:g}) must be below "
                             f"drop.timeout_s ({self.drop.timeout_s:g} s), or windows close without data the "
                             f"sensor actors still hold; lower it")
        if self.security.curve is None:
            keyed = [f"sensors[{i}].public_key" for i, s in enumerate(self.sensors) if s.public_key is not None]
            keyed += ["output.authorized_keys"] if self.output.authorized_keys is not None else []
            if keyed:
                raise ValueError(f"{', '.join(keyed)} only apply with CURVE authentication; add security.curve "
                                 f"(secret_key, authorized_keys) or remove them")
        if self.pipeline.shared_model_process and (self.fusion.resources or self.fusion.num_gpus):
            raise ValueError("fusion.resources and fusion.num_gpus do not apply with pipeline.shared_model_process "
                             "(fusion runs in the restorer's process); set restorer.resources and restorer.num_gpus")
        self._distinct_endpoints()
        return self

    def _distinct_endpoints(self) -> None:
        """No two of the sensors', the output's, the recorder's and the HTTP endpoint are one: spelled alike, or,
        with the embedded Ray (every actor on this machine), TCP on one port of one host (localhost is 127.0.0.1;
        a wildcard host is every address of this machine). In a cluster each actor's localhost is its own node's."""
        here = self.ray.address is None
        named = [(f"sensors[{i}].endpoint ({s.name})", s.endpoint, s.bind) for i, s in enumerate(self.sensors)]
        named += [("output.endpoint", self.output.endpoint, True)]
        named += [("recorder.endpoint", self.recorder.endpoint, False)] if self.recorder is not None else []
        places = []
        for key, endpoint, binds in named:
            host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
            tcp = here and endpoint.startswith("tcp://")
            places.append((key, endpoint, _tcp_place(host, int(port), binds) if tcp else endpoint))
        if self.http is not None and here:
            places.append(("http.port", f"{self.http.host}:{self.http.port}",
                           _tcp_place(self.http.host, self.http.port, True)))
        for i, (key, endpoint, place) in enumerate(places):
            for other_key, other, other_place in places[:i]:
                if place == other_place or (isinstance(place, tuple) and isinstance(other_place, tuple)
                                            and _same_place(place, other_place)):
                    raise ValueError(f"{other_key} ({other}) and {key} ({endpoint}) are one endpoint; give each "
                                     f"sensor, the output, the recorder and http a port of its own")

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.sensors})

    def resolved(self) -> DaemonConfig:
        """The configuration with every path absolute (against the current directory), for processes that may
        start elsewhere, as Ray's workers do."""
        def absolute(path: Path | None) -> Path | None:
            return None if path is None else path.resolve()

        curve = self.security.curve
        return self.model_copy(update={
            "bundle": absolute(self.bundle),
            "sensors": [s.model_copy(update={"public_key": absolute(s.public_key)}) for s in self.sensors],
            "output": self.output.model_copy(update={"authorized_keys": absolute(self.output.authorized_keys)}),
            "security": self.security if curve is None else SecurityConfig(curve=CurveConfig(
                secret_key=absolute(curve.secret_key), authorized_keys=absolute(curve.authorized_keys)))})


_FIXES = {
    "missing": "add this key",
    "extra_forbidden": "remove it or check its spelling",
    "float_parsing": "use a number such as 2.0",
    "float_type": "use a number such as 2.0",
    "finite_number": "use a finite number such as 2.0",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "use a quoted string",
    "list_type": "use a YAML list (- item per line)",
    "model_type": "use a mapping of keys to values",
    "model_attributes_type": "use a mapping of keys to values",
    "literal_error": "use one of the values listed",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
    "int_from_float": "use a whole number",
    "string_too_short": "use a non-empty value",
    "string_too_long": "use a shorter value",
    "dict_type": "use a mapping of keys to values",
    "path_type": "use a path, such as models/lab",
    "too_short": "add at least one entry",
}


def _format_location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _format_errors(source: str, error: ValidationError, raw: dict) -> str:
    lines = [f"{source}: {error.error_count()} problem(s) in the configuration"]
    for item in error.errors():
        key = _format_location(tuple(p for p in item["loc"] if p not in ("function-after",)))
        message = item["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(item["type"])
        got = "" if item["type"] in ("missing", "model_type") else f" (got {item.get('input')!r:.60})"
        if item["type"] == "extra_forbidden" or isinstance(item.get("input"), dict):  # (a section: the message says)
            got = ""
        lines.append(f"  {key}: {message}{got}" + (f" -> fix: {fix}" if fix else ""))
    return "\n".join(lines)


def parse_config(raw: object, source: str = "config") -> DaemonConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (bundle, sensors, ...), "
                          f"got {type(raw).__name__}")
    try:
        return DaemonConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, raw)) from None


def load_config(path: str | Path) -> DaemonConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if _values_beyond(raw, MAX_VALUES):
        raise ConfigError(f"{path}: the configuration expands to more than {MAX_VALUES:,} values (YAML aliases "
                          f"repeating each other?); a daemon's configuration has a few hundred: write it out")
    return parse_config(raw, str(path))


MAX_VALUES = 100_000


def _values_beyond(raw, limit: int) -> bool:
    """Whether a YAML document holds more than `limit` values, counting each use of an alias again (a few
    nested aliases make billions of them, which validating would walk)."""
    stack, seen = [raw], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False
