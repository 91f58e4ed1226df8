"""Raw media: open_clip towers, the audio tower, offline checkpoints, media windows in the
sensor ingest, bundles trained on a JSONL manifest, and jpeg/rgb8/pcm16/utf8 through the daemon."""

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse import wire
from mmfuse.bundle import load_bundle
from mmfuse.inference import embed, predict
from mmfuse.media import MediaEncoder, pcm16_samples
from mmfuse.towers import AudioTower, ImageTower, StreamingLogMel, TextTower, TowerError, build_clip, clip_config, \
    preprocess_config, resolve_pretrained
from mmfuse.training.evaluate import main as eval_main
from mmfuse.datasets import read_manifest
from mmfuse.training.train import main as train_main

from conftest import MEDIA_TRAINING
from test_end_to_end import Lab, collect


def queue(encoder: MediaEncoder, message: wire.SensorMessage) -> None:
    encoder.add(message, encoder.prepare(message))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(clip_config("mmfuse-tiny"))


class LengthTower:
    """Stands in for the audio tower: a segment's vector is its length in samples."""
    segment_s = 1.0

    def __init__(self, rate):
        self.rate = self.segment_samples = rate

    def encode(self, items):
        return np.array([[len(i.finish() if isinstance(i, Samples) else i)] for i in items], np.float32)

    def spectrogram(self):
        return Samples()


class Samples:
    """Stands in for the audio tower's running log-mel: the samples themselves."""

    def __init__(self):
        self.chunks = []

    def add(self, samples):
        self.chunks.append(samples)

    def finish(self):
        return np.concatenate(self.chunks)


def images(n, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(n)]


def jpeg(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_towers_give_vectors_of_their_dim_deterministically(tiny_clip):
    image_tower = ImageTower(tiny_clip, preprocess_config("mmfuse-tiny", None, clip_config("mmfuse-tiny"))).eval()
    text_tower = TextTower(tiny_clip, 40).eval()
    audio_tower = AudioTower().eval()
    pictures = images(3)
    assert image_tower.encode(pictures).shape == (3, 128)
    np.testing.assert_array_equal(image_tower.encode(pictures), image_tower.encode(pictures))
    texts = ["a happy day", "so sad", ""]
    assert text_tower.encode(texts).shape == (3, 128)
    np.testing.assert_array_equal(text_tower.encode(texts), text_tower.encode(texts))
    waves = [np.sin(np.arange(8000) / 10).astype(np.float32), np.zeros(20000, np.float32)]
    assert audio_tower.encode(waves).shape == (2, 128)
    np.testing.assert_array_equal(audio_tower.encode(waves), audio_tower.encode(waves))
    # batching does not change a sample's vector
    np.testing.assert_allclose(image_tower.encode(pictures[:1])[0], image_tower.encode(pictures)[0], atol=1e-5)


def test_every_tower_warms_up_on_stand_in_items_of_its_kind(tiny_clip):
    for tower in (ImageTower(tiny_clip, preprocess_config("mmfuse-tiny", None, clip_config("mmfuse-tiny"))),
                  TextTower(tiny_clip, 40), AudioTower()):
        tower.warm_up()
        assert tower.encode([tower.example()]).shape == (1, tower.dim)


def test_the_text_tower_skips_the_padding_and_encodes_as_open_clip_does(tiny_clip):
    tower = TextTower(tiny_clip, clip_config("mmfuse-tiny")["text_cfg"]["context_length"])
    tokens = tower.prepare(["ok", "so this is what I was talking about, really great", ""])
    assert tokens.shape[1] == 40 and int(tokens.argmax(dim=-1).max()) < 20
    with torch.no_grad():
        assert torch.allclose(tower(tokens), tiny_clip.encode_text(tokens), atol=1e-5)


def test_an_uncached_tag_offline_fails_within_seconds_and_says_what_to_get(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(TowerError) as error:
        resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "`pretrained:`" in message
    with pytest.raises(TowerError, match="no pretrained tag 'nope'"):
        resolve_pretrained("ViT-B-32", "nope")
    with pytest.raises(TowerError, match="does not exist"):
        resolve_pretrained("ViT-B-32", str(tmp_path / "missing.pt"))


def test_mmfuse_train_with_an_uncached_tag_fails_fast(media_manifest, tmp_path, capsys):
    started = time.monotonic()
    code = train_main(["--data", str(media_manifest), "--out", str(tmp_path / "b"), "--clip-model", "ViT-B-32",
                       "--pretrained", "laion2b_s34b_b79k"])
    assert code == 2 and time.monotonic() - started < 10
    assert "not in the offline Hugging Face cache" in capsys.readouterr().err


def test_a_checkpoint_written_here_loads_and_fine_tunes(tiny_clip, media_manifest, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": tiny_clip.state_dict()}, checkpoint)
    assert resolve_pretrained("mmfuse-tiny", str(checkpoint)) == str(checkpoint)
    loaded = build_clip(clip_config("mmfuse-tiny"), str(checkpoint))
    for (name, a), b in zip(tiny_clip.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    out = tmp_path / "finetuned"
    assert train_main(["--data", str(media_manifest), "--out", str(out), "--pretrained", str(checkpoint),
                       "--tower-epochs", "1", "--contrastive-epochs", "1", "--encoder-epochs", "2", "--head-epochs", "2",
                       "--restorers", "zero"]) == 0
    assert load_bundle(out).manifest["media"]["clip"]["pretrained"] == str(checkpoint)


def test_camera_frames_are_thinned_to_k_per_window():
    class CountingTower:
        def encode(self, items):
            return np.ones((len(items), 4), np.float32)

    encoder = MediaEncoder("visual", CountingTower(), frame_period_s=2.0)
    frame = np.zeros((8, 8, 3), np.uint8)
    for i in range(60):  # 4 s of a 15 fps camera
        queue(encoder, wire.rgb8_message("s", "cam0", i, i / 15, frame))
    spans = encoder.encode()
    assert [s.start for s in spans] == [0.0, 2.0] and encoder.skipped_frames == 58


def test_live_audio_is_encoded_as_the_whole_segment_would_be_with_its_log_mel_made_as_it_came():
    tower = AudioTower().eval()
    rng = np.random.default_rng(3)
    wave = rng.normal(0, 0.2, 16000 * 2 + 7000)
    running, wholes = [], []
    for sizes in ([16000] * 3, [1600] * 30, [7, 194, 1, 1700, 3, 9999] + [100] * 20, [1600] * 10, [16000]):
        spectrogram, done = tower.spectrogram(), 0
        for size in sizes:
            spectrogram.add(wave[done:done + size].astype(np.float32))
            done += size
        running.append(spectrogram)
        wholes.append(tower.logmel(torch.from_numpy(wave[:done].astype(np.float32))[None])[0].numpy())
    np.testing.assert_allclose(running[0].finish(), wholes[0], atol=1e-5)
    # finished together, as a window end finishes every session's segment; once finished, the same again
    for log_mel, whole in zip(StreamingLogMel.finish_all(running) + StreamingLogMel.finish_all(running), wholes * 2):
        np.testing.assert_allclose(log_mel, whole, atol=1e-5)
    batch = tower.prepare([running[3], wave[:16000].astype(np.float32), wholes[4]])
    np.testing.assert_allclose(batch.numpy(), np.stack([wholes[3]] * 3), atol=1e-5)

    encoder = MediaEncoder("audio", tower, frame_period_s=1.0)
    pcm = np.round(wave * 32767).clip(-32768, 32767) / 32767
    for i in range(23):  # 2.3 s in 100 ms chunks: two whole segments, then a partial one at the stream's end
        queue(encoder, wire.pcm16_message("s", "mic0", i, i * 0.1, pcm[i * 1600:(i + 1) * 1600], 16000))
    encoder.end(("s", "mic0"))
    spans = encoder.encode()
    heard = pcm16_samples(wire.pcm16_message("s", "mic0", 0, 0.0, pcm[:23 * 1600], 16000))
    expected = tower.encode([heard[:16000], heard[16000:32000], heard[32000:]])
    assert [(round(s.start, 3), round(s.end, 3)) for s in spans] == [(0.0, 1.0), (1.0, 2.0), (2.0, 2.3)]
    np.testing.assert_allclose(np.stack([s.vector for s in spans]), expected, atol=1e-5)


def test_audio_is_cut_on_the_segment_grid_and_counts_only_once_complete():
    encoder = MediaEncoder("audio", LengthTower(rate=1000), frame_period_s=1.0)
    key = ("s", "mic0")
    for i in range(25):  # 2.5 s in 100 ms chunks
        queue(encoder, wire.pcm16_message("s", "mic0", i, i * 0.1, np.zeros(100), 1000))
    assert encoder.complete_until(key, 2.5) == pytest.approx(2.0)
    spans = encoder.encode()
    assert [(round(s.start, 3), round(s.end, 3)) for s in spans] == [(0.0, 1.0), (1.0, 2.0)]
    encoder.end(key)
    (last,) = encoder.encode()
    assert (round(last.start, 3), round(last.end, 3)) == (2.0, 2.5)
    assert last.vector[0] == 1000  # a partial segment is tiled up to the segment length
    assert encoder.complete_until(key, 2.5) == 2.5


def test_an_undecodable_jpeg_is_counted_and_nothing_else_is_lost(media_bundle):
    from mmfuse.ingest import SensorIngest

    tower = load_bundle(media_bundle).towers()["visual"]
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, tower.dim, media=MediaEncoder("visual", tower, 1.0))
    ingest.ingest(wire.encode(wire.jpeg_message("s", "cam0", 0, 0.0, b"\xff\xd8 not a jpeg")), 0.0)
    ingest.ingest(wire.encode(wire.jpeg_message("s", "cam0", 1, 0.1, jpeg(images(1)[0]))), 0.0)
    batch = ingest.take_batch()
    assert ingest.rejected.counts == {"undecodable": 1}
    assert len(batch.deltas) == 1 and batch.deltas[0].total.shape == (tower.dim,)


class CountingTower:
    """Stands in for the image tower: counts what it encodes; a frame's vector is its mean pixel value."""
    dim = 1

    def __init__(self):
        self.encoded = []

    def encode(self, items):
        self.encoded.extend(items)
        return np.array([[float(np.mean(i))] for i in items], np.float32)


def test_a_window_ends_batch_leaves_the_next_windows_frame_for_later_and_reports_its_stream_up_to_it():
    from mmfuse.ingest import SensorIngest

    tower = CountingTower()
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, 1, media=MediaEncoder("visual", tower, 1.0))
    for i in range(16):  # 15 fps from 0.0 through 1.0: the frame at 1.0 begins window 1
        frame = np.full((8, 8, 3), 10 * (i // 15 + 1), np.uint8)
        ingest.ingest(wire.encode(wire.rgb8_message("s", "cam0", i, i / 15, frame, 1 / 15)), 100.0 + i / 15)
    assert ingest.due
    batch = ingest.take_batch(as_of=101.1, defer_media=True)
    assert len(tower.encoded) == 1  # window 0's frame, which it may close on
    (progress,) = batch.progress
    assert progress.progress == pytest.approx(1.0)
    assert {d.window_id: d.weight for d in batch.deltas} == {0: 1.0, 1: 0.0}  # window 1: a frame, not encoded
    later = ingest.take_batch(as_of=101.3, defer_media=True)  # not due: everything is encoded
    assert len(tower.encoded) == 2 and later.progress[0].progress == pytest.approx(16 / 15)
    assert [(d.window_id, d.weight, float(d.total[0])) for d in later.deltas] == [(1, 1.0, 20.0)]
    frame = np.zeros((8, 8, 3), np.uint8)
    ingest.ingest(wire.encode(wire.rgb8_message("s", "cam0", 16, 2.0, frame, 1 / 15)), 102.0)
    ingest.ingest(wire.encode(wire.SensorMessage("s", "cam0", "visual", 17, 2.1, kind="end")), 102.1)
    ending = ingest.take_batch(as_of=102.2, defer_media=True)  # an ended stream holds no window back
    assert len(tower.encoded) == 3 and ending.progress[0].ended and ending.progress[0].progress == pytest.approx(2.1)


def test_a_live_batch_encodes_one_tower_batch_and_the_rest_waits_with_its_streams_held_back_due_next():
    from mmfuse.ingest import SensorIngest

    tower = CountingTower()
    tower.live_batch = 2
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, 1, media=MediaEncoder("visual", tower, 1.0))
    for session in ("a", "b", "c"):  # window 0's frame of each session, then window 1's, which ends window 0
        for seq, t in enumerate((0.0, 1.0)):
            ingest.ingest(wire.encode(wire.rgb8_message(session, "cam0", seq, t, np.full((8, 8, 3), 10, np.uint8),
                                                        1 / 15)), 101.0 + t)
    batch = ingest.take_batch(as_of=102.1, defer_media=True)
    assert len(tower.encoded) == 2 and ingest.media.overflow == 1 and ingest.due  # one batch; the rest goes next
    assert {p.session: p.progress for p in batch.progress} == {"a": 1.0, "b": 1.0, "c": 0.0}  # c: not encoded
    batch = ingest.take_batch(as_of=102.2, defer_media=True)
    assert len(tower.encoded) == 3 and not ingest.due
    assert {p.session: p.progress for p in batch.progress} == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert ingest.take_batch().progress[0].progress == pytest.approx(16 / 15)  # not live: all at once
    assert len(tower.encoded) == 6


def test_a_jpeg_is_decoded_when_encoded_and_pixels_that_do_not_decode_cost_only_themselves():
    from mmfuse.ingest import SensorIngest

    tower = CountingTower()
    ingest = SensorIngest("cam0", "visual", 1.0, 1.0, 1, media=MediaEncoder("visual", tower, 0.5))
    whole = jpeg(images(1)[0])
    ingest.ingest(wire.encode(wire.jpeg_message("s", "cam0", 0, 0.0, whole[:len(whole) // 2])), 100.0)  # header ok
    ingest.ingest(wire.encode(wire.jpeg_message("s", "cam0", 1, 0.5, whole)), 100.5)
    assert ingest.accepted == 2 and not ingest.rejected.counts and not tower.encoded
    batch = ingest.take_batch()
    assert ingest.media.failed == 1 and ingest.media.encoded == 1 and tower.encoded[0].shape == (40, 56, 3)
    assert [(d.window_id, d.weight) for d in batch.deltas] == [(0, 1.0)]


def test_a_bundle_trained_on_media_reloads_with_identical_embeddings(media_bundle, media_manifest, tmp_path):
    bundle = load_bundle(media_bundle)
    media = bundle.manifest["media"]
    assert set(media["towers"]) == {"audio", "visual", "text"}
    assert media["clip"]["model"] == "mmfuse-tiny" and media["clip"]["preprocess"]["size"] == 64
    assert bundle.labels == ["negative", "neutral", "positive"] and bundle.task == "sentiment"
    first, second = load_bundle(media_bundle).towers(), load_bundle(media_bundle).towers()
    pictures = images(2)
    np.testing.assert_array_equal(first["visual"].encode(pictures), second["visual"].encode(pictures))
    # evaluating the training manifest's validation rows reproduces the metrics recorded at training time
    out = tmp_path / "eval.json"
    assert eval_main(["--bundle", str(media_bundle), "--data", str(media_manifest), "--subset", "validation",
                      "--protocol", "fixed", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    recorded = bundle.manifest["metrics"]["validation"]
    for name in ("zero", "mean"):
        for condition in ("a", "v", "t", "avt"):
            assert result["restorers"][name]["fixed"][condition]["acc"] == \
                pytest.approx(recorded[name][condition]["acc"], abs=1e-4), (name, condition)


def test_eval_on_a_media_manifest_has_the_missing_protocol(media_bundle, media_manifest, tmp_path):
    out = tmp_path / "eval.json"
    assert eval_main(["--bundle", str(media_bundle), "--data", str(media_manifest), "--seeds", "2",
                      "--json", str(out)]) == 0
    entry = json.loads(out.read_text())["restorers"]["mean"]
    assert set(entry) == {"fixed", "rate", "missing", "reliability"}
    assert set(entry["missing"]) == {"eta", "audio", "visual", "text", "mixed"} and entry["missing"]["eta"] == 0.7
    assert entry["fixed"]["full"] == entry["fixed"]["avt"]


def test_a_text_only_manifest_trains_and_evaluates_the_full_condition(tmp_path):
    lines = [json.dumps({"utterance_id": f"d{d}_{i}", "dialogue_id": f"d{d}", "turn": i,
                         "text": f"{'great fun' if (d + i) % 2 else 'awful sad'} words {i}",
                         "label": "happy" if (d + i) % 2 else "sad"}) for d in range(8) for i in range(6)]
    manifest = tmp_path / "text.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    assert train_main(["--data", str(manifest), "--out", str(tmp_path / "b"), "--task-name", "emotion",
                       *MEDIA_TRAINING]) == 0
    bundle = load_bundle(tmp_path / "b")
    assert list(bundle.modalities) == ["text"] and list(bundle.restorers) == ["zero"] and bundle.task == "emotion"
    out = tmp_path / "eval.json"
    assert eval_main(["--bundle", str(tmp_path / "b"), "--data", str(manifest), "--json", str(out)]) == 0
    fixed = json.loads(out.read_text())["restorers"]["zero"]["fixed"]
    assert set(fixed) == {"t", "full"} and fixed["full"]["acc"] > 0.9


def test_raw_media_windows_through_the_daemon(media_bundle, media_manifest, tmp_path):
    """jpeg and rgb8 camera frames, pcm16 audio and utf8 text in; the decisions match the
    bundle's offline prediction on the same media."""
    bundle = load_bundle(media_bundle)
    towers = bundle.towers()
    rows = read_manifest(media_manifest)[:3]
    from mmfuse.datasets import read_image, read_wav

    window = 1.0
    encodings = {"raw-jpeg": "jpeg", "raw-rgb8": "rgb8"}
    media, expected = [], {}
    for row in rows:
        picture, wave_ = read_image(row.image), read_wav(row.audio, 16000)[:16000]
        media.append((picture, wave_, row.text))
        segment = (np.clip(wave_, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768
        for session, encoding in encodings.items():
            frame = np.asarray(Image.open(io.BytesIO(jpeg(picture))).convert("RGB")) if encoding == "jpeg" else picture
            expected[(session, len(media) - 1)] = {"visual": towers["visual"].encode([frame])[0],
                                                   "audio": towers["audio"].encode([segment])[0],
                                                   "text": towers["text"].encode([row.text])[0]}
    lab = Lab(tmp_path, media_bundle, {"method": "mean"}, window=window)
    try:
        lab.wait_ready()
        seq = {(session, name): 0 for session in encodings for name in lab.sockets}

        def send(session, name, message):
            lab.sockets[name].send_multipart(wire.encode(message))
            seq[session, name] += 1

        start = time.monotonic()
        for w, (picture, wave_, text) in enumerate(media):  # live: each window's media when its window begins
            time.sleep(max(0.0, start + w * window - time.monotonic()))
            for session, encoding in encodings.items():
                for f in range(15):  # a 15 fps camera; only the first frame of a window is encoded
                    n, t = seq[session, "cam0"], w + f / 15
                    send(session, "cam0", wire.jpeg_message(session, "cam0", n, t, jpeg(picture))
                         if encoding == "jpeg" else wire.rgb8_message(session, "cam0", n, t, picture))
                for c in range(10):
                    send(session, "mic0", wire.pcm16_message(session, "mic0", seq[session, "mic0"], w + c / 10,
                                                             wave_[c * 1600:(c + 1) * 1600], 16000))
                send(session, "asr0", wire.text_message(session, "asr0", seq[session, "asr0"], w + 0.1, text, 0.8))
        time.sleep(max(0.0, start + len(media) * window - time.monotonic()))
        for session in encodings:
            for name in lab.sockets:
                lab.sockets[name].send_multipart(wire.encode(wire.SensorMessage(
                    session=session, source=name, modality=lab_modality(name), seq=seq[session, name],
                    t=len(media), kind="end")))
        received = collect(lab.decisions, quiet_s=6, expect=len(expected))
    finally:
        lab.close()
    assert sorted((d["session"], d["window"]["id"]) for d in received) == sorted(expected), lab.daemon.log(200)
    head = bundle.head("complete")
    encoders = bundle.encoders()
    for decision in received:
        assert sorted(decision["present"]) == ["audio", "text", "visual"] and decision["restored"] == []
        features = {m: torch.from_numpy(v[None]) for m, v in expected[(decision["session"],
                                                                       decision["window"]["id"])].items()}
        z, present = embed(encoders, features, bundle.modality_order, 1, bundle.manifest["embed_dim"])
        outputs, _ = predict(head, bundle.restorer("mean"), z, present)
        temperature = bundle.restorers["mean"]["temperatures"]["avt"]  # the daemon's scores are calibrated
        probabilities = torch.softmax(outputs / temperature, dim=-1)[0].tolist()
        assert [decision["scores"][label] for label in bundle.labels] == pytest.approx(probabilities, abs=2e-3)


def lab_modality(name):
    return {"cam0": "visual", "mic0": "audio", "asr0": "text"}[name]


def test_a_manifest_of_dialogues_gets_session_context_by_default(tmp_path):
    lines = [json.dumps({"utterance_id": f"d{d}_{i}", "dialogue_id": f"d{d}", "turn": i, "text": f"words {i}",
                         "label": "happy" if i % 2 else "sad"}) for d in range(6) for i in range(4)]
    manifest = tmp_path / "dialogues.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    assert train_main(["--data", str(manifest), "--out", str(tmp_path / "b"), "--tower-epochs", "1",
                       "--encoder-epochs", "2", "--head-epochs", "2"]) == 0
    assert load_bundle(tmp_path / "b").context == 3


def test_a_heartbeat_completes_an_unfinished_audio_segment_and_resampling_does_not_drift():
    encoder = MediaEncoder("audio", LengthTower(rate=16000), frame_period_s=1.0)
    key = ("s", "mic0")
    queue(encoder, wire.pcm16_message("s", "mic0", 0, 0.0, np.zeros(8000), 16000))  # half a segment, then silence
    assert encoder.complete_until(key, 0.5) == 0.0
    encoder.heartbeat(key, 0.6)
    assert encoder.complete_until(key, 0.6) == 0.6 and len(encoder.encode()) == 1
    # 10 minutes of 44.1 kHz audio in 1024-sample chunks: the segment grid stays on the sensor's clock
    t, seq = 0.0, 1
    for _ in range(int(600 * 44100 / 1024)):
        queue(encoder, wire.pcm16_message("s", "mic1", seq, t, np.zeros(1024), 44100))
        t += 1024 / 44100
        seq += 1
    spans = encoder.encode()
    assert len(spans) == int(t) and abs(spans[-1].end - int(t)) < 1e-3


def test_an_image_bomb_is_rejected_not_decoded():
    from mmfuse.media import MediaError, decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000)).save(buffer, format="JPEG", quality=1)
    with pytest.raises(MediaError, match="too_large"):
        decode_image(wire.jpeg_message("s", "cam0", 0, 0.0, buffer.getvalue()))


def test_strip_images_are_refused_and_a_failing_item_costs_only_itself():
    from mmfuse.media import MediaEncoder, MediaError, decode_image

    with pytest.raises(MediaError, match="16-fold"):
        decode_image(wire.rgb8_message("s", "cam0", 0, 0.0, np.zeros((1, 2000, 3), np.uint8)))

    class Tower:
        dim = 2

        def encode(self, items):
            if "bad" in items:
                raise RuntimeError("tower failure")
            return np.ones((len(items), 2), np.float32)

    encoder = MediaEncoder("text", Tower(), 1.0)
    for seq, text in enumerate(["good", "bad", "fine"]):
        queue(encoder, wire.text_message("s", "asr0", seq, float(seq), text, 1.0))
    assert [span.start for span in encoder.encode()] == [0.0, 2.0] and encoder.failed == 1
