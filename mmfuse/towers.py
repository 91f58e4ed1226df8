"""Media towers: open_clip's image and text towers and a log-mel audio encoder.

They turn raw media (decoded camera frames, ASR text, PCM audio) into feature
vectors; a bundle's stage-1 `ModalityEncoder` then maps those vectors into the
common embedding space, exactly as it does for pre-extracted `features`, so raw and
feature sensors of one modality mix. Training (`mmfuse.training.media`) makes the
towers, a bundle stores them, sensor actors run them.

`open_clip` takes seconds to import: it is imported only where a tower is built.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class TowerError(Exception):
    """A tower that cannot be built; the message says what to fetch or change."""


def _open_clip():
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def clip_config(model: str) -> dict:
    """The open_clip model config (JSON data) of a model name: ours first, then open_clip's."""
    own = CONFIG_DIR / f"{model}.json"
    if own.is_file():
        return json.loads(own.read_text())
    config = _open_clip().get_model_config(model)
    if config is None:
        raise TowerError(f"unknown open_clip model {model!r}: use a name from open_clip.list_models() such as "
                         f"ViT-B-32, or a small config shipped with mmfuse ({', '.join(shipped_configs())})")
    return copy.deepcopy(config)


def resolve_pretrained(model: str, pretrained: str | None) -> str | None:
    """A local checkpoint file for `pretrained` (a path, or a tag already in the offline cache).

    Never touches the network: a tag that is not cached fails at once, saying which file
    to get and where to put it (open_clip itself retries for most of a minute offline).
    """
    if not pretrained:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
        raise TowerError(f"pretrained checkpoint {pretrained} does not exist: give the path of an open_clip "
                         f"checkpoint file (.pt, .bin or .safetensors)")
    open_clip = _open_clip()
    source = open_clip.get_pretrained_cfg(model, pretrained)
    if not source:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise TowerError(f"open_clip has no pretrained tag {pretrained!r} for {model} (tags: "
                         f"{', '.join(tags) or 'none'}); or set `pretrained` to a checkpoint path")
    if source.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(source["hf_hub"])  # "org/name/" means open_clip's default file names
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in candidates:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
        raise TowerError(f"pretrained {model} {pretrained!r} is not in the offline Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and this machine cannot download it. Get "
                         f"https://huggingface.co/{repo}/resolve/main/{candidates[0]} elsewhere and set "
                         f"`pretrained:` to the file's path, or copy a cache made with "
                         f"`hf download {repo} {candidates[0]}` to {constants.HF_HUB_CACHE}")
    url = source.get("url", "")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if target.is_file():
        return str(target)
    raise TowerError(f"pretrained {model} {pretrained!r} is not cached: get {url} and put it at {target}, "
                     f"or set `pretrained:` to the file's path")


def build_clip(config: dict, checkpoint: str | None = None) -> nn.Module:
    """An open_clip CLIP model from its config data, with weights from a local checkpoint if given."""
    open_clip = _open_clip()
    if "multimodal_cfg" in config or "hf_model_name" in config.get("text_cfg", {}):
        raise TowerError("only open_clip models with open_clip's own text tower are supported "
                         "(no CoCa, no Hugging Face text towers)")
    model = open_clip.model.CLIP(**config)
    if checkpoint:
        try:
            open_clip.load_checkpoint(model, checkpoint)
        except Exception as exc:  # a wrong file surfaces as anything from KeyError to a pickle error
            raise TowerError(f"cannot load {checkpoint} into this model config: {exc}") from None
    return model


def preprocess_config(model: str, pretrained: str | None, config: dict) -> dict:
    """Image size, normalisation and resizing the image tower expects (from the pretrained tag when known)."""
    open_clip = _open_clip()
    size = config["vision_cfg"]["image_size"]
    source = open_clip.get_pretrained_cfg(model, pretrained) if pretrained and not Path(pretrained).exists() else {}
    return {"size": size if isinstance(size, int) else list(size),
            "mean": list(source.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": list(source.get("std", open_clip.OPENAI_DATASET_STD)),
            "interpolation": source.get("interpolation", "bicubic"),
            "resize_mode": source.get("resize_mode", "shortest")}


class Tower(nn.Module):
    """A media tower: `prepare` turns raw items into a CPU batch, `forward` encodes a batch on the tower's
    device, `encode` does both and returns the features on the CPU. A live sensor encodes at most `live_batch`
    items in one call (None: all it has), so that it is not kept from its socket and the aligner for long."""

    live_batch: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, items: list) -> np.ndarray:
        return self(self.prepare(items).to(self.device)).cpu().numpy()

    def warm_up(self) -> None:
        """Encode a busy push's worth of stand-in items once: a first pass at a batch size costs up to twice a
        later one (allocations, kernel set-up), and it should not fall on the first live windows."""
        self.encode([self.example()] * (self.live_batch or 64))

    def example(self):
        """One item of the kind `prepare` takes."""
        raise NotImplementedError


class ImageTower(Tower):
    """open_clip image tower: RGB uint8 images [H, W, 3] -> feature vectors."""

    live_batch = 32  # mmfuse-tiny: 64 frames took 0.25-0.83 s of a loaded 2-core machine (docs/results.md)

    def __init__(self, clip: nn.Module, preprocess: dict):
        super().__init__()
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.visual = clip.visual
        size = preprocess["size"]
        self.transform = image_transform_v2(PreprocessCfg(
            size=size if isinstance(size, int) else tuple(size), mean=tuple(preprocess["mean"]),
            std=tuple(preprocess["std"]), interpolation=preprocess["interpolation"],
            resize_mode=preprocess["resize_mode"]), is_train=False)

    @property
    def dim(self) -> int:
        return self.visual.output_dim

    def example(self) -> np.ndarray:
        return np.zeros((120, 160, 3), np.uint8)

    def prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        return torch.stack([self.transform(Image.fromarray(image)) for image in images])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class TextTower(Tower):
    """open_clip text tower and its BPE tokenizer: strings -> feature vectors."""

    def __init__(self, clip: nn.Module, context_length: int):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.clip = clip
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.skips_padding = (getattr(clip, "attn_mask", None) is not None  # causal, pooled at the end token
                              and getattr(clip, "text_pool_type", None) == "argmax"
                              and isinstance(getattr(clip, "text_projection", None), nn.Parameter))

    @property
    def dim(self) -> int:
        return self.clip.text_projection.shape[1]

    def example(self) -> str:
        return "a sentence to warm up with"

    def prepare(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's encode_text, on the tokens up to the longest text's end token when the text transformer is
        causal and pools at that token (CLIP's): no position attends past itself, so the padding after it
        changes nothing and costs most of the work (3x on short ASR segments)."""
        clip = self.clip
        if not self.skips_padding:
            return clip.encode_text(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1  # (the end token has the highest id)
        tokens = tokens[:, :length]
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:length].to(cast)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
        return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ clip.text_projection


def mel_filterbank(rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] triangular filters on the HTK mel scale."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    edges = 700.0 * (10 ** (np.linspace(to_mel(0.0), to_mel(rate / 2), n_mels + 2) / 2595.0) - 1.0)
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0, None).T.astype(np.float32))


class LogMel(nn.Module):
    """Waveform [B, samples] -> log-mel spectrogram [B, n_mels, frames] (25 ms windows, 10 ms hop at 16 kHz)."""

    def __init__(self, rate: int = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(rate, n_fft, n_mels), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(waveform, self.n_fft, self.hop, window=self.window, return_complex=True)
        power = spectrum.real ** 2 + spectrum.imag ** 2  # (|z| ** 2 by way of abs() takes twice as long)
        return torch.log(torch.einsum("bft,fm->bmt", power, self.filters) + 1e-6)

    def streaming(self) -> StreamingLogMel:
        """A log-mel of one waveform that takes its samples as they come (on the CPU)."""
        return StreamingLogMel(self.n_fft, self.hop, self.window.cpu(), self.filters.cpu())


class StreamingLogMel:
    """What LogMel gives for one waveform (to float rounding), computed while its samples arrive: frame t needs
    samples up to t * hop + n_fft / 2, so all but the last few frames are done before the waveform is complete,
    and `finish` adds those. Padded at both ends by reflection, as torch.stft pads."""

    BLOCK_FRAMES = 25  # frames computed together: a call costs ~60 us however few it computes

    def __init__(self, n_fft: int, hop: int, window: torch.Tensor, filters: torch.Tensor):
        self.n_fft, self.hop, self.pad = n_fft, hop, n_fft // 2
        self.window, self.filters = window, filters
        self.start: np.ndarray | None = np.zeros(0, np.float32)  # samples until the start can be padded
        self.signal = np.zeros(0, np.float32)  # the padded signal from the first frame not yet computed
        self.frames: list[torch.Tensor] = []   # [frames, n_mels] blocks
        self.finished: np.ndarray | None = None

    def add(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32)
        if self.start is not None:
            self.start = np.concatenate([self.start, samples])
            if len(self.start) <= self.pad:
                return
            samples, self.start = np.concatenate([self.start[self.pad:0:-1], self.start]), None
        self.signal = np.concatenate([self.signal, samples])
        if len(self.signal) >= self.n_fft + (self.BLOCK_FRAMES - 1) * self.hop:
            self._compute()

    def finish(self) -> np.ndarray:
        """The log-mel [n_mels, frames] of the whole waveform (at least n_fft / 2 + 1 samples)."""
        return self.finish_all([self])[0]

    @staticmethod
    def finish_all(spectrograms: list[StreamingLogMel]) -> list[np.ndarray]:
        """`finish` of several waveforms, their last frames computed together: a window end finishes every
        session's segment at once. A spectrogram finished before gives the same log-mel again."""
        todo = [s for s in spectrograms if s.finished is None]
        short = next((s for s in todo if s.start is not None), None)
        if short is not None:
            raise ValueError(f"a waveform of {len(short.start)} samples is too short to pad by {short.pad}")
        for spectrogram in todo:
            spectrogram.signal = np.concatenate([spectrogram.signal, spectrogram.signal[-2:-spectrogram.pad - 2:-1]])
        StreamingLogMel._compute_all(todo)
        for spectrogram in todo:
            spectrogram.finished = torch.cat(spectrogram.frames).T.numpy()
        return [spectrogram.finished for spectrogram in spectrograms]

    def _compute(self) -> None:
        self._compute_all([self])

    @staticmethod
    def _compute_all(spectrograms: list[StreamingLogMel]) -> None:
        """The frames each signal holds in full, in one pass for all (each op costs ~60 us however few frames)."""
        ready = [(s, count) for s in spectrograms if (count := (len(s.signal) - s.n_fft) // s.hop + 1) > 0]
        if not ready:
            return
        first = ready[0][0]
        frames = torch.cat([torch.from_numpy(s.signal).unfold(0, s.n_fft, s.hop)[:count] for s, count in ready])
        spectrum = torch.fft.rfft(frames * first.window)
        mels = torch.log((spectrum.real ** 2 + spectrum.imag ** 2) @ first.filters + 1e-6)
        for (spectrogram, count), mel in zip(ready, mels.split([count for _, count in ready])):
            spectrogram.frames.append(mel)
            spectrogram.signal = spectrogram.signal[count * spectrogram.hop:]


class AudioTower(Tower):
    """PCM audio -> log-mel -> a small 1-D conv net, mean-pooled over time -> feature vector.

    Trained by mmfuse-train on fixed-length segments; the daemon cuts live audio into
    the same segments and averages their vectors over a window.
    """

    def __init__(self, rate: int = 16000, segment_s: float = 1.0, n_mels: int = 64, width: int = 128,
                 out_dim: int = 128):
        super().__init__()
        self.rate, self.segment_s, self.out_dim = rate, segment_s, out_dim
        self.logmel = LogMel(rate, n_mels=n_mels)
        self.norm = nn.InstanceNorm1d(n_mels)
        self.net = nn.Sequential(
            nn.Conv1d(n_mels, width, 5, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 5, padding=2, stride=2), nn.GELU(),
            nn.Conv1d(width, width, 5, padding=2, stride=2), nn.GELU(),
        )
        self.proj = nn.Linear(width, out_dim)

    @property
    def dim(self) -> int:
        return self.out_dim

    @property
    def segment_samples(self) -> int:
        return round(self.rate * self.segment_s)

    def example(self) -> np.ndarray:
        return np.zeros(self.segment_samples, np.float32)

    def prepare(self, items: list) -> torch.Tensor:
        """Waveforms, each cut or tiled to one segment, as a batch [B, samples]; where some items are log-mels of
        whole segments already ([n_mels, frames]), or a whole segment's `spectrogram()` given all its samples (the
        daemon's, made while the audio came, finished here together), a batch of log-mels [B, n_mels, frames]."""
        from mmfuse.media import fit_segment

        waves = [fit_segment(np.asarray(w, np.float32), self.segment_samples) if np.ndim(w) == 1 else w
                 for w in items]
        if all(np.ndim(w) == 1 for w in waves):
            return torch.from_numpy(np.stack(waves))
        StreamingLogMel.finish_all([w for w in waves if isinstance(w, StreamingLogMel)])
        return torch.from_numpy(np.stack([w.finished if isinstance(w, StreamingLogMel) else
                                          self.log_mel(w) if np.ndim(w) == 1 else w for w in waves]))

    def spectrogram(self) -> StreamingLogMel:
        """The log-mel of one segment, to be given its samples as they come."""
        return self.logmel.streaming()

    def log_mel(self, waveform: np.ndarray) -> np.ndarray:
        spectrogram = self.spectrogram()
        spectrogram.add(waveform)
        return spectrogram.finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, samples] or their log-mels [B, n_mels, frames] -> feature vectors."""
        mel = self.logmel(x) if x.dim() == 2 else x
        return self.proj(self.net(self.norm(mel)).mean(dim=-1))


def build_towers(media: dict, modalities: list[str], checkpoint: str | None = None) -> tuple[dict[str, nn.Module], nn.Module | None]:
    """The towers a bundle's `media` spec describes, for `modalities` only, and the CLIP model the image
    and text towers share (None when neither is asked for). Weights: random, or CLIP's from `checkpoint`."""
    wanted = [m for m in modalities if m in media["towers"]]
    towers, clip = {}, None
    if {"visual", "text"} & set(wanted):
        clip = build_clip(media["clip"]["config"], checkpoint)
        if "visual" in wanted:
            towers["visual"] = ImageTower(clip, media["clip"]["preprocess"])
        if "text" in wanted:
            towers["text"] = TextTower(clip, media["clip"]["context_length"])
    if "audio" in wanted:
        towers["audio"] = AudioTower(**media["audio"]["args"])
    return towers, clip
