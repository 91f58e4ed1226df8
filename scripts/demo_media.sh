#!/usr/bin/env bash
# The raw-media demo: train a bundle with open_clip towers on MVSA images and tweets
# (plus generated audio, see below), start mmfuse-daemon, replay held-out tweets as live
# JPEG camera frames (5 fps), ASR text segments and microphone audio, each sensor losing
# 30 % of its utterances, and print decisions.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
data_dir=${MMFUSE_DATA:-../shared/data}
mkdir -p out/demo-media

if [ -f "$data_dir/mvsa/labels.jsonl" ]; then
    echo "== using real MVSA tweets (images + texts) from $data_dir/mvsa, the first 800 for a short demo;"
    echo "   MVSA has no audio: each tweet gets GENERATED audio (babble, not speech, unrelated to the label)"
    data=$($bin/python -c "from mmfuse.training.media import with_generated_audio; print(with_generated_audio('$data_dir/mvsa/labels.jsonl', 'out/demo-media/mvsa', 800))")
else
    echo "== $data_dir/mvsa/labels.jsonl not found: generating a stand-in media set (NOT real data)"
    data=$($bin/python -c "from mmfuse.training.media import make_synthetic_media; print(make_synthetic_media('out/demo-media/generated'))")
fi

echo "== training models/demo-media (short schedule for the demo; mmfuse-train's defaults train longer)"
$bin/mmfuse-train --data "$data" --out models/demo-media --tower-epochs 3 --restorers zero,mean,autoencoder

echo "== starting mmfuse-daemon --config config/demo-media.yaml (log: out/demo-media/daemon.log)"
$bin/mmfuse-daemon --config config/demo-media.yaml >out/demo-media/daemon.log 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null || true' EXIT

echo "== replaying 16 held-out tweets as sessions at 2x: camera, text and microphone each lost 30% of the time"
$bin/mmfuse-replay --config config/demo-media.yaml --data "$data" --held-out-by models/demo-media --speed 2 \
    --sessions 16 --drop visual:0.3 --drop text:0.3 --drop audio:0.3 --listen --wait-s 180

kill -TERM $daemon
status=0
wait $daemon || status=$?
trap - EXIT
echo "== daemon drained and exited with status $status"
exit $status
