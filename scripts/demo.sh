#!/usr/bin/env bash
# The demo: train a bundle, start mmfuse-daemon, replay recorded sessions through it
# with a flaky text sensor and a camera that dies, and print decisions as they arrive.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
data_dir=${MMFUSE_DATA:-../shared/data}
mkdir -p out/demo

if [ -f "$data_dir/mosi/mosi_train.npz" ]; then
    data="$data_dir/mosi/mosi_train.npz"
    echo "== using real CMU-MOSI utterance features from $data"
else
    data=out/demo/generated_features.npz
    echo "== $data_dir/mosi/mosi_train.npz not found: generating a stand-in feature set (NOT real data) at $data"
    $bin/python -c "from mmfuse.training.data import make_synthetic; make_synthetic('$data')"
fi

echo "== training models/demo: the mean restorer the demo's configuration uses (kept if data and arguments are unchanged)"
$bin/mmfuse-train --data "$data" --out models/demo --restorers zero,mean --if-changed

echo "== starting mmfuse-daemon --config config/demo.yaml (log: out/demo/daemon.log)"
$bin/mmfuse-daemon --config config/demo.yaml >out/demo/daemon.log 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null || true' EXIT

echo "== replaying 4 sessions the bundle never trained on, in real time: text lost 30% of the time, camera dead after 20 s"
$bin/mmfuse-replay --config config/demo.yaml --data "$data" --held-out-by models/demo --sessions 4 \
    --drop text:0.3 --kill visual@20s --listen --wait-s 180

kill -TERM $daemon
status=0
wait $daemon || status=$?
trap - EXIT
echo "== daemon drained and exited with status $status"
exit $status
