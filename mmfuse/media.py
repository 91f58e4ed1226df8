"""Raw media of one sensor -> feature vectors over time spans, encoded in batches. No I/O.

A sensor actor hands every decoded media message to a `MediaEncoder` and, once per
batch interval, asks it to encode what it queued: one forward pass of the tower for
all sessions of that sensor. What is queued is already thinned out:

- camera frames (`jpeg`, `rgb8`): at most one frame per `frame_period_s` per stream
  (window length / frames per window), so a 15 fps camera costs one image encode per
  window; each encoded frame counts at its time stamp. A JPEG's header is checked when
  it arrives, its pixels are decoded when it is encoded: off the receive path;
- text (`utf8`): one vector per segment, over the segment's span;
- audio (`pcm16`): cut into segments on a fixed time grid (`segment_s`, the length the
  audio tower was trained on), one vector per segment. A stream's audio counts as
  delivered only up to the start of its unfinished segment (`complete_until`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

from mmfuse.wire import SensorMessage

IMAGE_ENCODINGS = ("jpeg", "rgb8")
MEDIA_ENCODINGS = {"visual": IMAGE_ENCODINGS, "text": ("utf8",), "audio": ("pcm16",)}
MIN_PARTIAL_SEGMENT_S = 0.2  # a shorter audio remainder (stream end, gap) is not worth a vector
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_ASPECT = 16  # a towers' resize of the short side to ~224 px would blow a 1 x 2000 strip up to gigabytes
SKIPPED = object()  # a camera frame thinned out: prepared, never decoded


class MediaError(ValueError):
    """A media payload that cannot be decoded; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _opened(source):
    """A Pillow image with only its header read; MediaError for anything Pillow cannot parse and for images
    over MAX_IMAGE_PIXELS (decompression bombs) or MAX_ASPECT."""
    from PIL import Image

    try:
        image = Image.open(source)
    except Exception as exc:  # Pillow raises many unrelated types (incl. DecompressionBombError) for bad input
        raise MediaError("undecodable", f"{type(exc).__name__}: {exc}") from None
    _check_size(image.width, image.height)
    return image


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError("too_large", f"{width}x{height} image; at most {MAX_IMAGE_PIXELS} pixels are decoded")
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise MediaError("aspect", f"{width}x{height} image: sides differ more than {MAX_ASPECT}-fold")


def rgb_image(source) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an encoded image (a file object); raises MediaError for anything
    Pillow cannot decode and for images too large or too narrow (see _opened)."""
    with _opened(source) as image:
        try:
            return np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise MediaError("undecodable", f"{type(exc).__name__}: {exc}") from None


def _named(message: SensorMessage, exc: MediaError) -> MediaError:
    return MediaError(exc.reason, f"{message.encoding} of {message.session}/{message.source} seq {message.seq}: "
                      f"{exc.detail}")


def probe_image(message: SensorMessage) -> None:
    """Check a `jpeg` or `rgb8` message's header (format, size, aspect) without decoding its pixels."""
    try:
        if message.encoding == "rgb8":
            _check_size(message.shape[1], message.shape[0])
        else:
            _opened(io.BytesIO(message.data)).close()
    except MediaError as exc:
        raise _named(message, exc) from None


def decode_image(message: SensorMessage) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a `jpeg` or `rgb8` message."""
    try:
        if message.encoding == "rgb8":
            _check_size(message.shape[1], message.shape[0])
            return message.array()
        return rgb_image(io.BytesIO(message.data))
    except MediaError as exc:
        raise _named(message, exc) from None


def pcm16_samples(message: SensorMessage) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of a `pcm16` message, at the message's own rate."""
    return np.frombuffer(message.data, dtype="<i2").astype(np.float32) / 32768.0


def fit_segment(wave: np.ndarray, samples: int) -> np.ndarray:
    """A waveform cut to, or tiled up to, one segment: padding with silence would skew its statistics."""
    if len(wave) >= samples:
        return wave[:samples]
    return np.tile(wave, math.ceil(samples / max(1, len(wave))))[:samples]


def split_segments(wave: np.ndarray, samples: int, rate: int) -> list[tuple[np.ndarray, float]]:
    """A recording cut as the daemon cuts live audio: (segment, seconds of real audio in it);
    a remainder shorter than MIN_PARTIAL_SEGMENT_S is dropped unless it is all there is."""
    pieces = [wave[i:i + samples] for i in range(0, len(wave), samples)] or [wave]
    kept = [p for p in pieces if len(p) / rate >= MIN_PARTIAL_SEGMENT_S] or pieces[:1]
    return [(fit_segment(p, samples), len(p) / rate) for p in kept]


@dataclass(slots=True)
class EncodedSpan:
    """A feature vector covering [start, end] of one stream (start == end: an instant)."""
    session: str
    source: str
    start: float
    end: float
    vector: np.ndarray


@dataclass(slots=True)
class _Pending:
    session: str
    source: str
    start: float
    end: float
    item: object  # image array, text, waveform or a whole segment's spectrogram: what the tower's encode() takes;
                  # a jpeg message until then


@dataclass
class _AudioSegment:
    index: int                   # position on the grid: covers [index * segment_s, (index + 1) * segment_s)
    start: float                 # where its audio begins (later than the grid point for a stream's first segment)
    spectrogram: object          # the tower's, of its samples so far: all but its last frames ready at its end
    chunks: list = field(default_factory=list)
    samples: int = 0


class MediaEncoder:
    def __init__(self, modality: str, tower, frame_period_s: float):
        self.modality = modality
        self.tower = tower
        self.live_batch = getattr(tower, "live_batch", None)  # the most items a live batch encodes at once
        self.frame_period = frame_period_s
        self.pending: list[_Pending] = []
        self.last_slot: dict[tuple[str, str], int] = {}
        self.audio: dict[tuple[str, str], _AudioSegment] = {}
        self.resampled: dict[tuple[str, str], tuple[int, int]] = {}  # (input, output) samples so far
        self.skipped_frames = 0
        self.encoded = 0
        self.failed = 0  # items that could not be decoded or encoded
        self.overflow = 0  # items the last `encode` left queued past its limit, not because they may wait

    def accepts(self, encoding: str) -> bool:
        return encoding in MEDIA_ENCODINGS[self.modality]

    def prepare(self, message: SensorMessage) -> object:
        """What this message will contribute, checked: raises MediaError for a payload that cannot be read, and
        changes nothing, so a stream's state need not change for a frame that fails. A `jpeg` is checked by its
        header (format, size, aspect) and stays the message until `encode` decodes it; a camera frame the
        thinning will skip is SKIPPED."""
        if message.encoding not in IMAGE_ENCODINGS:
            return message.data if message.encoding == "utf8" else pcm16_samples(message)
        probe_image(message)
        if self._slot(message) is None:
            return SKIPPED
        return message.array() if message.encoding == "rgb8" else message

    def _slot(self, message: SensorMessage) -> int | None:
        """The frame slot a camera frame fills, or None if its stream has filled that slot already."""
        slot = math.floor(message.t / self.frame_period)
        return None if slot <= self.last_slot.get((message.session, message.source), -math.inf) else slot

    def add(self, message: SensorMessage, item: object) -> None:
        """Queue a message's prepared item (from `prepare`), at the message's time."""
        key = (message.session, message.source)
        if message.encoding in IMAGE_ENCODINGS:
            slot = None if item is SKIPPED else self._slot(message)
            if slot is None:
                self.skipped_frames += 1
                return
            self.last_slot[key] = slot
            self.pending.append(_Pending(*key, message.t, message.t, item))
        elif message.encoding == "utf8":
            if item.strip():
                self.pending.append(_Pending(*key, message.t, message.t + message.duration, item))
        else:
            self._add_audio(key, message.t, self._resample(key, item, message.rate))

    def _resample(self, key: tuple[str, str], samples: np.ndarray, rate: int) -> np.ndarray:
        """Linear resampling to the tower's rate, carrying the phase across chunks so no drift builds up."""
        target = self.tower.rate
        if rate == target or not len(samples):
            return samples
        done_in, done_out = self.resampled.get(key, (0, 0))
        total_out = (done_in + len(samples)) * target // rate
        positions = np.arange(done_out, total_out) * rate / target - done_in
        self.resampled[key] = (done_in + len(samples), total_out)
        return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)

    def _add_audio(self, key: tuple[str, str], t: float, samples: np.ndarray) -> None:
        rate, length = self.tower.rate, self.tower.segment_s
        segment = self.audio.get(key)
        if segment is not None and t - (segment.start + segment.samples / rate) > 0.05:
            self._close_segment(key)  # a gap in the audio: the unfinished segment ends where its audio did
            segment = None
        while len(samples):
            if segment is None:
                segment = self.audio[key] = _AudioSegment(math.floor((t + 0.5 / rate) / length), t,
                                                          self.tower.spectrogram())
            end = segment.start + segment.samples / rate
            room = max(1, round(((segment.index + 1) * length - end) * rate))
            taken, samples = samples[:room], samples[room:]
            segment.chunks.append(taken)
            segment.spectrogram.add(taken)
            segment.samples += len(taken)
            t = segment.start + segment.samples / rate
            if len(taken) == room:  # reached the grid boundary
                self._close_segment(key)
                segment = None

    def _close_segment(self, key: tuple[str, str]) -> None:
        segment = self.audio.pop(key, None)
        if segment is None or segment.samples / self.tower.rate < MIN_PARTIAL_SEGMENT_S:
            return
        if segment.samples >= self.tower.segment_samples:
            item = segment.spectrogram  # finished by the tower's encode, with every other segment encoded then
        else:  # a partial segment is tiled up to a whole one, and its log-mel made of that at encode
            item = fit_segment(np.concatenate(segment.chunks), self.tower.segment_samples)
        self.pending.append(_Pending(*key, segment.start, segment.start + segment.samples / self.tower.rate, item))

    def complete_until(self, key: tuple[str, str], reached: float) -> float:
        """Event time up to which this stream's media has been queued for encoding."""
        segment = self.audio.get(key)
        return reached if segment is None else min(reached, segment.start)

    def end(self, key: tuple[str, str]) -> None:
        """The stream ended: its unfinished audio segment is encoded as it is."""
        self._close_segment(key)

    def queued_from(self) -> dict[tuple[str, str], float]:
        """Per stream with media queued, where the earliest of it starts."""
        starts: dict[tuple[str, str], float] = {}
        for p in self.pending:
            key = (p.session, p.source)
            starts[key] = min(starts.get(key, math.inf), p.start)
        return starts

    def forget(self, key: tuple[str, str]) -> None:
        """The stream has been idle long enough to forget: drop its state (an unfinished segment is long late)."""
        self.audio.pop(key, None)
        self.last_slot.pop(key, None)
        self.resampled.pop(key, None)

    def heartbeat(self, key: tuple[str, str], t: float) -> None:
        """Everything up to t has been sent: an unfinished segment whose audio ends before t is complete."""
        segment = self.audio.get(key)
        if segment is not None and t >= segment.start + segment.samples / self.tower.rate - 1e-6:
            self._close_segment(key)

    def encode(self, later=None, limit: int | None = None) -> list[EncodedSpan]:
        """Encode what is queued, all sessions in one batch; what `later(session, source, start)` says may wait
        stays queued, and so does what comes after the first `limit` of the rest (`overflow` counts those)."""
        pending, self.pending = self.pending, []
        if later is not None:
            waiting = [later(p.session, p.source, p.start) for p in pending]
            self.pending = [p for p, wait in zip(pending, waiting) if wait]
            pending = [p for p, wait in zip(pending, waiting) if not wait]
        self.overflow = 0 if limit is None else max(0, len(pending) - limit)
        if self.overflow:  # the oldest go first, next time too
            pending, self.pending = pending[:limit], pending[limit:] + self.pending
        if not pending:
            return []
        ready = [(p, item) for p in pending if (item := _decoded(p.item)) is not None]
        try:
            vectors = list(self.tower.encode([item for _, item in ready])) if ready else []
        except Exception:  # one bad item must not cost the batch: find it by encoding one by one
            vectors = [self._encode_one(item) for _, item in ready]
        spans = [EncodedSpan(p.session, p.source, p.start, p.end, v)
                 for (p, _), v in zip(ready, vectors) if v is not None]
        self.encoded += len(spans)
        self.failed += len(pending) - len(spans)
        return spans

    def _encode_one(self, item) -> np.ndarray | None:
        try:
            return self.tower.encode([item])[0]
        except Exception:
            return None


def _decoded(item):
    """A queued item as the tower takes it: a jpeg message decoded (None if its pixels do not decode)."""
    if not isinstance(item, SensorMessage):
        return item
    try:
        return decode_image(item)
    except MediaError:
        return None
