"""Train on mosi_train.npz with mosi_dev.npz as --val for several seeds, evaluate every bundle on the dev file, and
print the restorer tables (mean ± std over seeds) as docs/results.md shows them.

    python bench/dev_selection.py --name defaults --seeds 0 1 2
    python bench/dev_selection.py --name no-mutual --seeds 0 1 2 -- --mutual-epochs 0

Arguments after `--` go to mmfuse-train. Bundles and JSON land in out/dev/NAME/; the training time of each seed is
printed and written beside. The data folder comes from MMFUSE_DATA (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from restorer_table import main as print_tables  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    own, train_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="experiment name: out/dev/NAME")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--restorer", default="all", help="restorers to evaluate (mmfuse-eval --restorer)")
    args = parser.parse_args(own)
    from mmfuse.datasets import data_dir

    train, dev = data_dir() / "mosi" / "mosi_train.npz", data_dir() / "mosi" / "mosi_dev.npz"
    if not dev.is_file():
        print(f"no {dev}: set MMFUSE_DATA to the folder with mosi/mosi_dev.npz", file=sys.stderr)
        return 2
    out = ROOT / "out" / "dev" / args.name
    out.mkdir(parents=True, exist_ok=True)
    results, times = [], {}
    for seed in args.seeds:
        bundle = out / f"s{seed}"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "mmfuse.training.train", "--data", str(train), "--val", str(dev),
                        "--out", str(bundle), "--seed", str(seed), *train_args], check=True,
                       stdout=subprocess.DEVNULL)
        times[seed] = round(time.monotonic() - started, 1)
        result = out / f"s{seed}.json"
        subprocess.run([sys.executable, "-m", "mmfuse.training.evaluate", "--bundle", str(bundle), "--data", str(dev),
                        "--restorer", args.restorer, "--protocol", "both", "--json", str(result)], check=True,
                       stdout=subprocess.DEVNULL)
        results.append(str(result))
        print(f"seed {seed}: trained in {times[seed]} s", file=sys.stderr)
    (out / "training_s.json").write_text(json.dumps({"train_args": train_args, "seconds": times}, indent=1))
    print(f"## {args.name}: mmfuse-train {' '.join(train_args) or '(defaults)'}; training {times} s\n")
    return print_tables(results)


if __name__ == "__main__":
    sys.exit(main())
