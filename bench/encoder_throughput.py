"""Throughput of the media towers as the sensor actors run them (one torch thread each).

    python bench/encoder_throughput.py [--models mmfuse-tiny ViT-B-32]

For each open_clip model: camera frames/s (JPEG decode + preprocessing + image tower)
and sentences/s (tokenizer + text tower) at batch 1, 8 and 32; audio segments/s of the
audio tower. Weights are random: throughput does not depend on them. Then, per
model, the CPU time one session costs per window (one frame, one sentence, and
window-length / segment-length audio segments, at batch 32) and the number of live
sessions at 1 window/s that fit in the machine's cores at 80 % load (three sensor
actors, one thread each, share the cores). Prints a table and writes JSON (default
bench/results/encoder_throughput.json). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfuse import wire
from mmfuse.media import decode_image
from mmfuse.towers import AudioTower, ImageTower, TextTower, build_clip, clip_config, preprocess_config

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "I can't believe how well this turned out, honestly the best day of the week #happy"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mmfuse-tiny", "ViT-B-32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent per measurement")
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "encoder_throughput.json"))
    return parser.parse_args()


def per_second(run, items: int, seconds: float) -> float:
    run()  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        done += items
    return done / (time.perf_counter() - started)


def camera_jpeg(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (224, 168, 3), dtype=np.uint8)  # MVSA-sized frame
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    frames = [wire.jpeg_message("s", "cam0", i, 0.0, camera_jpeg(i)) for i in range(max(args.batches))]
    results = {"cpu": os.cpu_count(), "torch_threads": 1, "models": {}}
    audio = AudioTower().eval()
    segments_per_window = args.window_s / audio.segment_s
    waves = [np.random.default_rng(i).normal(0, 0.1, audio.segment_samples).astype(np.float32)
             for i in range(max(args.batches))]
    results["audio"] = {f"batch_{b}": round(per_second(lambda b=b: audio.encode(waves[:b]), b, args.seconds), 1)
                        for b in args.batches}
    for model in args.models:
        config = clip_config(model)
        clip = build_clip(config).eval()
        image_tower = ImageTower(clip, preprocess_config(model, None, config)).eval()
        text_tower = TextTower(clip, config["text_cfg"].get("context_length", 77)).eval()
        entry = {"frames_per_s": {}, "sentences_per_s": {}}
        for b in args.batches:
            entry["frames_per_s"][f"batch_{b}"] = round(per_second(
                lambda b=b: image_tower.encode([decode_image(f) for f in frames[:b]]), b, args.seconds), 1)
            entry["sentences_per_s"][f"batch_{b}"] = round(per_second(
                lambda b=b: text_tower.encode([SENTENCE] * b), b, args.seconds), 1)
        big = f"batch_{max(args.batches)}"
        cost = (1 / entry["frames_per_s"][big] + 1 / entry["sentences_per_s"][big]
                + segments_per_window / results["audio"][big])
        entry["cpu_s_per_session_window"] = round(cost, 5)
        entry["sessions_at_1_window_per_s"] = int(0.8 * os.cpu_count() / cost)
        results["models"][model] = entry
        print(f"{model}: {entry}", file=sys.stderr)

    print(f"| model | frames/s (b={'/'.join(map(str, args.batches))}) | sentences/s | audio segments/s | "
          f"CPU s per session-window | sessions at 1 window/s |")
    print("|---|---|---|---|---|---|")
    audio_cell = " / ".join(str(v) for v in results["audio"].values())
    for model, entry in results["models"].items():
        print(f"| {model} | {' / '.join(str(v) for v in entry['frames_per_s'].values())} | "
              f"{' / '.join(str(v) for v in entry['sentences_per_s'].values())} | {audio_cell} | "
              f"{entry['cpu_s_per_session_window']} | {entry['sessions_at_1_window_per_s']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
