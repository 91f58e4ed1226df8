"""Model bundles: a directory with manifest.json and safetensors weight files.

`mmfuse-train` writes them, the daemon and `mmfuse-eval` read them. Every weight
file's sha256 is recorded in the manifest and checked on load. Reading a manifest needs no torch
(`mmfuse-daemon --check` answers at once); the weights import it when they are loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

import mmfuse
from mmfuse.options import FUSION_HEADS, RESTORERS

if TYPE_CHECKING:
    import torch

FORMAT = 1
MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle that is missing, damaged, or does not fit what asked for it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def labels(self) -> list[str]:
        return self.manifest["labels"]

    @property
    def modalities(self) -> dict[str, dict]:
        return self.manifest["modalities"]

    @property
    def restorers(self) -> dict[str, dict]:
        return self.manifest["restorers"]

    @property
    def context(self) -> int:
        """How many previous windows of the session the fusion heads see (0: none)."""
        return self.manifest.get("context", 0)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        filename = f"{name}.safetensors"
        expected = self.manifest["files"].get(filename)
        if expected is None:
            raise BundleError(f"{self.path}: the manifest lists no {filename}")
        path = self._verify_file(filename, expected)
        from safetensors.torch import load_file

        return load_file(path)

    @property
    def modality_order(self) -> list[str]:
        """Modalities in the order of the M axis of embeddings."""
        return list(self.modalities)

    @contextmanager
    def _building(self, what: str):
        """A model the manifest describes but that cannot be built or take its weights is a damaged bundle."""
        try:
            yield
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            problem = " ".join(str(exc).split())[:300]
            raise BundleError(f"bundle {self.id} ({self.path}): its {what} cannot be built from the manifest and "
                              f"weights ({type(exc).__name__}: {problem}); the bundle was edited or made by another "
                              f"mmfuse version: train it again") from None

    def encoders(self) -> dict[str, torch.nn.Module]:
        from mmfuse.models import build_encoder

        result = {}
        for modality, spec in self.modalities.items():
            with self._building(f"{modality} encoder"):
                encoder = build_encoder(spec["encoder"]["arch"], **spec["encoder"]["args"])
                encoder.load_state_dict(self.tensors(f"encoder_{modality}"))
            result[modality] = encoder.eval()
        return result

    def towers(self, modalities: list[str] | None = None) -> dict[str, torch.nn.Module]:
        """The trained media towers (modality -> tower) of a bundle made from raw media, for `modalities`
        (default: all); {} for a bundle made from features. Only what is asked for is built and loaded."""
        media = self.manifest.get("media")
        if not media:
            return {}
        from mmfuse.towers import build_towers

        with self._building("media towers"):
            towers, clip = build_towers(media, self.modality_order if modalities is None else modalities)
            if clip is not None:
                clip.load_state_dict(self.tensors("clip"))
            if "audio" in towers:
                towers["audio"].load_state_dict(self.tensors("tower_audio"))
        return {m: tower.eval() for m, tower in towers.items()}

    def head(self, name: str) -> torch.nn.Module:
        from mmfuse.models import build_fusion_head

        with self._building(f"fusion head {name!r}"):
            spec = self.manifest["heads"][name]
            head = build_fusion_head(spec["arch"], **spec["args"])
            head.load_state_dict(self.tensors(f"head_{name}"))
        return head.eval()

    def complete_head(self) -> torch.nn.Module | None:
        """The head trained on complete data, used for windows with every modality (None if not trained)."""
        return self.head("complete") if "complete" in self.manifest["heads"] else None

    def restorer(self, name: str, **overrides):
        """The named restorer; `overrides` replace arguments it was trained with (diffusion sampler settings).
        Where the bundle says it steps aside for some presence patterns, it comes wrapped in SteppingAside."""
        if name not in self.restorers:
            raise BundleError(f"bundle {self.id} has no '{name}' restorer (it has {', '.join(self.restorers)})")
        state = self.tensors(f"restorer_{name}") if f"restorer_{name}.safetensors" in self.manifest["files"] else {}
        from mmfuse.restorers import RESTORERS, SteppingAside

        with self._building(f"restorer {name!r}"):
            restorer = RESTORERS[name].from_state(state, {**self.restorers[name].get("args", {}), **overrides})
        aside = self.restorers[name].get("step_aside")
        return SteppingAside(restorer, aside, self.modality_order) if aside else restorer

    def verify(self) -> None:
        """Raise BundleError unless every weight file the manifest lists is there with its sha256 (no torch):
        the daemon checks this before it starts anything, instead of an actor failing on it at start-up."""
        for filename, expected in self.manifest["files"].items():
            self._verify_file(filename, expected)

    def _verify_file(self, filename: str, expected: str) -> Path:
        path = self.path / filename
        if not path.is_file():
            raise BundleError(f"{path} is missing; the bundle is incomplete, train it again")
        try:
            found = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"{path} cannot be read ({exc.strerror or exc}); give the daemon's user read access "
                              f"to the bundle") from None
        if found != expected:
            raise BundleError(f"{path} does not match the sha256 in {MANIFEST}; the bundle is damaged")
        return path

    def check_fits(self, modalities: list[str], restorer: str) -> None:
        """Raise BundleError when a daemon with these sensors and this restorer cannot use the bundle."""
        unknown = sorted(set(modalities) - set(self.modalities))
        if unknown:
            raise BundleError(f"bundle {self.id} ({self.path}) was trained on {', '.join(sorted(self.modalities))}; "
                              f"the config has sensors for {', '.join(unknown)}: train a bundle with those "
                              f"modalities or remove those sensors")
        if restorer not in self.restorers:
            raise BundleError(f"bundle {self.id} ({self.path}) has no '{restorer}' restorer (it has "
                              f"{', '.join(self.restorers)}): set restorer.method to one of those or retrain")


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"no model bundle at {path} ({MANIFEST} not found); make one with "
                          f"`mmfuse-train --data FILE --out {path}`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); the bundle is damaged") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not a bundle's manifest (an "
                          f"object); the bundle is damaged")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} has bundle format {manifest.get('format')!r}; this mmfuse "
                          f"({mmfuse.__version__}) reads format {FORMAT}: retrain with this version")
    missing = [k for k in ("id", "task", "output", "labels", "modalities", "heads", "restorers", "files")
               if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks {', '.join(missing)}; the bundle is damaged")
    try:
        msgspec.convert(manifest, _Manifest)
        malformed = [] if len(set(manifest["labels"])) == len(manifest["labels"]) else ["labels (repeated)"]
    except msgspec.ValidationError as exc:
        entry = re.search(r"\$\.(\w+)", str(exc))
        malformed = [entry.group(1) if entry else str(exc)]
    if manifest["output"] == "classification" and len(manifest["labels"]) < 2 and not malformed:
        malformed.append("labels (a classifier's, fewer than two)")
    if not malformed:
        classifier = manifest["output"] == "classification"
        outputs = len(manifest["labels"]) if classifier else 1
        for name, head in manifest["heads"].items():
            got = head.get("args", {}).get("num_outputs")
            if got != outputs:
                malformed.append(f"heads.{name} ({got} outputs for {outputs} "
                                 f"{'labels' if classifier else 'regression value'})")
    if malformed:
        raise BundleError(f"{manifest_path}: {', '.join(malformed)} not as mmfuse-train writes them; the bundle is "
                          f"damaged or was edited: train it again")
    return Bundle(path, manifest)


_Name = Annotated[str, msgspec.Meta(min_length=1)]
_FileName = Annotated[str, msgspec.Meta(pattern=r"^(?!\.\.?$)[^/\\]+$")]  # a name in the bundle, no path


class _Modality(msgspec.Struct):
    dim: Annotated[int, msgspec.Meta(gt=0)]


class _Head(msgspec.Struct):
    arch: Literal[FUSION_HEADS]
    args: dict = msgspec.field(default_factory=dict)


class _Manifest(msgspec.Struct):
    """What load_bundle checks of a manifest's entries before anything reads them (other keys pass as they are)."""
    labels: list[_Name]
    modalities: Annotated[dict[str, _Modality], msgspec.Meta(min_length=1)]
    heads: Annotated[dict[str, _Head], msgspec.Meta(min_length=1)]
    restorers: Annotated[dict[Literal[RESTORERS], dict], msgspec.Meta(min_length=1)]
    files: Annotated[dict[_FileName, str], msgspec.Meta(min_length=1)]
    output: Literal["classification", "regression"]
    context: Annotated[int, msgspec.Meta(ge=0)] = 0
    embed_dim: Annotated[int, msgspec.Meta(gt=0)] = 1


def unreplaceable(path: str | Path) -> str | None:
    """Why a bundle must not be written to `path` (which is replaced whole), or None: it may hold nothing, an
    empty directory or a bundle, never anything else."""
    path = Path(path).absolute()
    if path.is_dir() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        return f"{path} is a directory holding files that are not a bundle (no {MANIFEST}); writing the bundle " \
               f"would replace them: give a new directory, or a bundle's to replace it"
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a bundle directory: give a directory"
    if path == Path(path.anchor):
        return f"{path} is the file system's root: give a directory for the bundle"
    return None


def save_bundle(path: str | Path, manifest: dict, weights: dict[str, dict[str, torch.Tensor]]) -> Bundle:
    """Write weight files and a manifest recording their sha256; returns the loaded bundle. The bundle is
    written beside `path` and then put in its place, so that an interruption never leaves a partial one."""
    from safetensors.torch import save_file

    problem = unreplaceable(path)
    if problem:
        raise BundleError(problem)
    path = Path(path).absolute()
    partial, retired = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.replaced")
    for leftover in (partial, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    files = {}
    for name, tensors in weights.items():
        filename = f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, partial / filename)
        files[filename] = sha256_file(partial / filename)
    manifest = {"format": FORMAT, **manifest, "files": files, "mmfuse_version": mmfuse.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    if path.exists():
        path.rename(retired)
    partial.rename(path)
    shutil.rmtree(retired, ignore_errors=True)
    return load_bundle(path)
