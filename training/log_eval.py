"""`mmfuse-eval --log session.mcap --labels labels.csv`: the pipeline on a recording, scored
against labelled spans, under the drops that really happened.

The recording runs through the daemon's pipeline on a virtual clock (its receive
times; mmfuse.pipeline.InProcessPipeline), so two runs give identical decisions. labels.csv has
rows `session,start,end,label` in the sensors' time; a decision takes the label of
the span that contains its window's midpoint (unlabelled windows are not scored).
Reports accuracy overall and by drop pattern (the modalities present), how many
windows each source was dropped in, and how long after its end each window closed.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from mmfuse import wire
from mmfuse.bundle import load_bundle
from mmfuse.config import load_config, parse_config
from mmfuse.pipeline import InProcessPipeline, receive_offset
from mmfuse.recording import read_recording
from mmfuse.datasets import DataError


def read_labels(path: str | Path) -> dict[str, list[tuple[float, float, str]]]:
    """session -> (start, end, label) spans of a CSV whose header names session,start,end,label (any case and
    order; a spreadsheet's byte-order mark is fine)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'a directory, not a CSV file' if path.is_dir() else 'no such file'}")
    spans = defaultdict(list)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is not None:
                reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            if reader.fieldnames is None or not {"session", "start", "end", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: the header must name session,start,end,label; it names "
                                f"{','.join(reader.fieldnames or []) or 'nothing'}")
            for number, row in enumerate(reader, 2):
                spans[row["session"]].append(_span(path, number, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 CSV") from None
    return spans


def _span(path: Path, number: int, row: dict) -> tuple[float, float, str]:
    if any(not row.get(key) for key in ("session", "start", "end", "label")):
        raise DataError(f"{path}:{number}: a row needs a session, start, end and label, got {row}")
    try:
        start, end = float(row["start"]), float(row["end"])
    except ValueError:
        raise DataError(f"{path}:{number}: start and end must be numbers, got {row}") from None
    if not (math.isfinite(start) and math.isfinite(end) and start < end):
        raise DataError(f"{path}:{number}: start and end must be finite, start before end, got {start:g}, {end:g}")
    return start, end, row["label"].strip()


def label_of(spans: list[tuple[float, float, str]], start: float, end: float) -> str | None:
    middle = (start + end) / 2
    return next((label for s, e, label in spans if s <= middle < e), None)


def decision_record(decision: wire.Decision) -> dict:
    """A decision as the wire carries it."""
    return wire.decode_decision(wire.encode_decision(decision))


def evaluate_log(log: str, labels: str | None, config_path: str | None, bundle_path: str | None,
                 decisions_out: str | None) -> dict:
    recorded_config, messages = read_recording(log)
    if config_path:
        config = load_config(config_path)
    elif recorded_config:
        config = parse_config(recorded_config, f"{log} (recorded configuration)")
    else:
        raise DataError(f"{log} carries no configuration: pass --config")
    bundle = load_bundle(bundle_path or config.bundle)
    bundle.check_fits(config.modalities, config.restorer.method)
    spans = read_labels(labels) if labels else {}
    unknown = sorted({label for session in spans.values() for _, _, label in session} - set(bundle.labels))
    if unknown:
        raise DataError(f"{labels}: label(s) {', '.join(unknown)} are not among bundle {bundle.id}'s labels "
                        f"({', '.join(bundle.labels)}); every window would count as wrong: use the bundle's names")
    recorded, configured = sorted({m.sensor for m in messages}), [s.name for s in config.sensors]
    if not set(recorded) & set(configured):
        raise DataError(f"{log}: its sensors ({', '.join(recorded)}) are none of the configuration's "
                        f"({', '.join(configured)}): leave --config out to use the one it was recorded with, or "
                        f"give one that names its sensors")
    run = InProcessPipeline(config, bundle).run([(m.received, m.sensor, [m.topic, m.payload]) for m in messages])
    offset = receive_offset(messages)
    decisions = sorted(run.decisions, key=lambda d: (d.session, d.window_id))
    records = []
    for decision in decisions:
        record = decision_record(decision)
        record["latency_ms"] = round((decision.closed_at - (decision.end + offset)) * 1000, 3)
        records.append(record)
    if decisions_out:
        Path(decisions_out).parent.mkdir(parents=True, exist_ok=True)
        Path(decisions_out).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    by_pattern: dict[str, list[bool]] = defaultdict(list)
    dropped: dict[str, int] = defaultdict(int)
    for record in records:
        for source in record["dropped"]:
            dropped[source] += 1
        truth = label_of(spans.get(record["session"], []), record["window"]["start"], record["window"]["end"])
        if truth is not None:
            by_pattern["".join(sorted((m[0] for m in record["present"]), key="avt".index))].append(
                record["label"] == truth)
    scored = [hit for hits in by_pattern.values() for hit in hits]
    delays = np.array([r["latency_ms"] for r in records])
    rejected = {sensor: {k: v for k, v in counts.items() if v} for sensor, counts in run.rejected.items()}
    for sensor, counts in run.unsupported.items():  # (data it has no tower for: unused, as good as rejected)
        rejected[sensor].update({f"{encoding} it cannot encode": n for encoding, n in counts.items() if n})
    unused = sorted(set(recorded) - set(configured))
    return {
        "log": str(log), "bundle": bundle.id, "restorer": config.restorer.method,
        "decisions": len(records), "sessions": len({r["session"] for r in records}), "labelled": len(scored),
        "acc": round(float(np.mean(scored)), 4) if scored else None,
        "by_pattern": {p: {"windows": len(h), "acc": round(float(np.mean(h)), 4)} for p, h in sorted(by_pattern.items())},
        "incomplete_windows": sum(bool(r["restored"]) for r in records),
        "dropped_windows_by_source": dict(sorted(dropped.items())),
        "close_delay_ms": {"p50": round(float(np.percentile(delays, 50)), 1),
                           "p99": round(float(np.percentile(delays, 99)), 1)} if records else None,
        "rejected": {sensor: counts for sensor, counts in rejected.items() if counts},
        "unused_sensors": unused,
        "labels_unmatched": bool(spans) and not scored,
        "why_none": None if records else _why_no_decision(rejected),
        "aligner": run.aligner,
    }


def _why_no_decision(rejected: dict[str, dict[str, int]]) -> str:
    if not any(rejected.values()):
        return "no window was decided: its messages closed none (too short a recording, or only heartbeats)"
    return "no window was decided: the sensors rejected or could not use every message (" + "; ".join(
        f"{sensor}: {_counted(counts)}" for sensor, counts in rejected.items() if counts) + ")"


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def print_log_summary(result: dict) -> None:
    print(f"{result['decisions']} decisions in {result['sessions']} session(s) of {result['log']} "
          f"(bundle {result['bundle']}, restorer {result['restorer']}); {result['incomplete_windows']} incomplete")
    if result["unused_sensors"]:
        print(f"  not replayed: {', '.join(result['unused_sensors'])} (sensors the configuration does not name)",
              file=sys.stderr)
    for sensor, counts in result["rejected"].items():
        print(f"  rejected by {sensor}: {_counted(counts)}", file=sys.stderr)
    if result["labels_unmatched"] and result["decisions"]:
        print("  warning: no decided window lies in a labelled span of its session: no accuracy (do the labels' "
              "session names and times, on the sensors' clock, match the recording's?)", file=sys.stderr)
    if result["acc"] is not None:
        print(f"  accuracy {result['acc']:.3f} on {result['labelled']} labelled windows; by modalities present: "
              + ", ".join(f"{p} {v['acc']:.3f} ({v['windows']})" for p, v in result["by_pattern"].items()))
    if result["dropped_windows_by_source"]:
        print("  windows with a dropped source: " + ", ".join(f"{s} {n}" for s, n in
                                                             result["dropped_windows_by_source"].items()))
    if result["close_delay_ms"] is not None:
        print(f"  window closed after its end: p50 {result['close_delay_ms']['p50']} ms, "
              f"p99 {result['close_delay_ms']['p99']} ms (recording clock)")
