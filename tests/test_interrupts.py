"""Ctrl-C is a normal way to stop every command: one line saying what was kept, exit status 130, no
traceback; the daemon stops at any moment of its start-up and leaves no Ray process behind."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import free_port
from test_end_to_end import SENSORS

BIN = Path(sys.executable).parent


def interrupted(command: list[str], after_s: float, signum=signal.SIGINT) -> tuple[int, str, float, list]:
    """(exit status, stderr, seconds from the signal to the exit, the processes it had started) of a command
    signalled `after_s` in."""
    # as from a terminal: SIGINT at its default, whatever this test process inherited or a library set in it
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signum)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
    return process.returncode, err, time.monotonic() - sent, children


def alive(processes: list) -> list:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("after_s", [0.3, 3.0, 7.0])  # importing, starting Ray, starting the actors
def test_ctrl_c_during_start_up_stops_the_daemon_at_once_and_leaves_no_ray_behind(tmp_path, bundle_dir, after_s):
    config = {"bundle": str(bundle_dir), "output": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
              "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{free_port()}"}
                          for n, m in SENSORS.items()]}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(config))
    status, err, took, children = interrupted([str(BIN / "mmfuse-daemon"), "--config", str(path)], after_s)
    assert "Traceback" not in err, err
    if "daemon ready" in err:  # a fast start: then Ctrl-C drains and stops it
        assert status == 130 and "stopped" in err, err
    else:
        assert status == 130 and "mmfuse-daemon: stopped during start-up" in err, err
    assert took < 30, err  # Ray's start and stop alone take 5-10 s on a loaded 2-core machine
    deadline = time.monotonic() + 10
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(children), f"left behind: {[p.cmdline()[:2] for p in alive(children)]}"


def test_ctrl_c_during_training_writes_no_bundle_and_leaves_an_earlier_one_as_it_was(tmp_path, feature_file,
                                                                                     bundle_dir):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text((bundle_dir / "manifest.json").read_text())
    status, err, _, _ = interrupted([str(BIN / "mmfuse-train"), "--data", str(feature_file), "--out", str(out),
                                     "--encoder-epochs", "5000"], 6.0)  # long enough to be stopped at 6 s
    assert status == 130 and "Traceback" not in err, err
    assert "mmfuse-train: stopped: no bundle was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (out / "manifest.json").read_text() == (bundle_dir / "manifest.json").read_text()


def test_ctrl_c_while_a_command_loads_is_one_line_not_a_traceback(feature_file, bundle_dir):
    # at 0.3 s mmfuse-eval is still importing torch, which it needs only once the bundle and the data are there
    status, err, _, _ = interrupted([str(BIN / "mmfuse-eval"), "--bundle", str(bundle_dir), "--data",
                                     str(feature_file)], 0.3)
    assert status == 130 and "Traceback" not in err and err.strip().startswith("mmfuse-eval: stopped"), err
