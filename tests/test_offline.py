"""Offline rendering with fakes at the seams: every slot rendered with the model's own mel window and its
own pose-video frame, in batches, deterministically."""
from __future__ import annotations

import math
import threading

import av
import numpy as np
import pytest

from capture.audio_sources import AudioChunk
from capture.pose_sources import encode_pose_video
from pcavs.alignment import TEMPLATE
from pcavs.constants import POSE_DIM, SAMPLES_PER_FRAME
from pcavs.mel import StreamingMel, wav_to_mel
from pcavs_live.pipeline.offline import OfflineOptions, OfflineRenderer, sequence_pose
from pcavs_live.pipeline.timeline import AudioTimeline
from tests.test_alignment import synthetic_landmarks
from tests.fakes import ChunkSource, RecordingSink
from tests.test_scheduler import speechlike


class RecordingRenderer:
    """Records the mel windows and pose codes of every slot it renders; frames are flat grey."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.windows: list[np.ndarray] = []
        self.poses: list[np.ndarray | None] = []

    def render(self, mel_windows, pose_codes=None, times=None):
        self.batches.append(len(mel_windows))
        self.windows.extend(np.asarray(mel_windows))
        self.poses.extend([None] * len(mel_windows) if pose_codes is None else np.asarray(pose_codes))
        return np.full((len(mel_windows), 8, 8, 3), 128, np.uint8)


def render(audio, upstream_numbering=False, pose=None, source=None, **options):
    renderer, sink = RecordingRenderer(), RecordingSink()
    offline = OfflineRenderer(source or ChunkSource(audio),
                              AudioTimeline(StreamingMel(1.0), upstream_frame_numbering=upstream_numbering),
                              renderer, sink, frame_size=(8, 8), pose=pose,
                              options=OfflineOptions(batch_size=4, **options))
    return offline.run(), renderer, sink


# --------------------------------------------------------------------------- audio: every slot, its window
def test_every_slot_is_rendered_in_batches_with_its_audio():
    audio = speechlike(3.0)
    source = ChunkSource(audio)
    summary, renderer, sink = render(audio, source=source)
    assert summary.frames_out == summary.frames_generated == 75 == math.ceil(len(audio) / SAMPLES_PER_FRAME)
    assert summary.frames_repeated == 0 and not summary.stopped_early
    assert sink.indices == list(range(75))
    assert renderer.batches == [4] * 18 + [3]
    np.testing.assert_array_equal(np.concatenate(sink.audio)[: len(audio)], audio)
    assert sink.opened == (8, 8, 25, 16000) and sink.closed and source.started and source.stopped


@pytest.mark.parametrize("upstream_numbering, first_row", [(False, lambda t: 4 * (t - 2)), (True, lambda t: 4 * t)])
def test_slot_t_is_rendered_from_the_models_mel_rows(upstream_numbering, first_row):
    """Slot t gets rows [4(t−2), 4(t−2)+20) of the whole file's mel (rows before 0 silent, i.e. zero), or
    [4t, 4t+20) with upstream's numbering; the last slot of the audio is covered (zeros past the end)."""
    audio = speechlike(1.01)  # 16160 samples → 26 slots, the last one partly silent
    summary, renderer, _ = render(audio, upstream_numbering)
    assert summary.frames_out == 26
    mel = wav_to_mel(audio, normalize=False)
    padded = np.concatenate([np.zeros((8, 80), np.float32), mel, np.zeros((40, 80), np.float32)])
    for t, window in enumerate(renderer.windows):
        start = first_row(t) + 8
        np.testing.assert_array_equal(window, padded[start:start + 20].T[None], err_msg=f"slot {t}")
    if not upstream_numbering:  # slot 0: 80 ms of silence before the start, then the speech
        assert not renderer.windows[0][0, :, :8].any() and renderer.windows[0][0, :, 8:].any(axis=0).all()


def test_a_burst_lights_the_slots_the_model_pairs_with_it():
    """A tone at 1.0–1.2 s reaches exactly the slots whose window, audio [40t−150, 40t+120) ms, overlaps
    it: t = 23..33 (with upstream numbering 80 ms earlier, 21..31); silence is exactly 0 in the mel."""
    audio = np.zeros(32000, np.float32)
    audio[16000:19200] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(3200) / 16000)
    for upstream_numbering, lit in ((False, range(23, 34)), (True, range(21, 32))):
        _, renderer, _ = render(audio, upstream_numbering)
        assert [t for t, w in enumerate(renderer.windows) if w.any()] == list(lit), upstream_numbering


def test_source_gap_is_filled_with_silence():
    audio = speechlike(1.0)
    _, _, sink = render(audio, source=ChunkSource(audio, skip_blocks=(10, 11)))
    out = np.concatenate(sink.audio)[: len(audio)]
    assert np.all(out[3200:3840] == 0)
    np.testing.assert_array_equal(out[:3200], audio[:3200])
    np.testing.assert_array_equal(out[3840:], audio[3840:])


def test_max_frames_and_stop_end_the_run():
    audio = speechlike(3.0)
    summary, _, sink = render(audio, max_frames=10)
    assert summary.frames_out == 10 and sink.indices == list(range(10)) and not summary.stopped_early
    stop = threading.Event()
    stop.set()
    renderer, sink = RecordingRenderer(), RecordingSink()
    summary = OfflineRenderer(ChunkSource(audio), AudioTimeline(StreamingMel(1.0)), renderer, sink,
                              frame_size=(8, 8)).run(stop)
    assert summary.stopped_early and summary.frames_out == 0 and sink.closed


# --------------------------------------------------------------------------- pose: slot t ↔ pose frame t
BITS, BLOCK = 8, 28  # the frame index, written as 8 black/white 28×28 blocks along the top of the frame


def index_frame(i: int) -> np.ndarray:
    img = np.full((224, 224, 3), 90, np.uint8)
    for b in range(BITS):
        img[:BLOCK, b * BLOCK:(b + 1) * BLOCK] = 255 if (i >> b) & 1 else 0
    return img


def read_index(img: np.ndarray) -> int:
    centres = img[BLOCK // 2, BLOCK // 2::BLOCK, :].mean(1)
    return int(sum(1 << b for b, v in enumerate(centres[:BITS]) if v > 128))


def write_index_video(path, n: int) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


class IndexReadingDetector:
    """Reads the frame index from the pixels and returns a face whose anchors are the template's, so the
    aligned crop is the frame itself; `no_face` lists frames where it finds nothing."""

    def __init__(self, no_face: tuple[int, ...] = ()) -> None:
        self.seen: list[int] = []
        self.no_face = no_face

    def detect(self, rgb):
        i = read_index(rgb)
        self.seen.append(i)
        return [] if i in self.no_face else [synthetic_landmarks(TEMPLATE)]


def index_encoder(crops: np.ndarray) -> np.ndarray:
    """A stand-in pose encoder whose code is the frame index read back from the aligned crop."""
    codes = np.zeros((len(crops), POSE_DIM), np.float32)
    codes[:, 0] = [read_index(c) for c in crops]
    return codes


@pytest.fixture(scope="module")
def index_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("pose") / "index.mp4"
    write_index_video(path, 7)
    return path


@pytest.mark.parametrize("upstream_numbering", [False, True])
def test_offline_slot_t_uses_pose_frame_t_every_frame_deterministically(index_video, upstream_numbering):
    """7 pose frames, 25 slots: slot t gets pose frame t, then the video plays back and forth as upstream's
    (with upstream numbering, frame t+2 as upstream's output t); two runs give the same codes."""
    runs = []
    for _ in range(2):
        detector = IndexReadingDetector()
        sequence = encode_pose_video(index_video, detector, index_encoder, batch_size=3)
        assert detector.seen == list(range(7))  # one landmark pass over every frame, in order
        _, renderer, _ = render(speechlike(1.0), upstream_numbering, pose=sequence_pose(sequence, upstream_numbering))
        runs.append(np.stack(renderer.poses))
    # upstream's order for 7 frames (calc_loop_idx): 0…6, 6…0, 0…6, …; upstream numbering starts at 2
    order = [0, 1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1]
    offset = 2 if upstream_numbering else 0
    assert runs[0][:, 0].astype(int).tolist() == order[offset:offset + 25]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_pose_frames_without_a_face_hold_a_neighbours_code(index_video):
    sequence = encode_pose_video(index_video, IndexReadingDetector(no_face=(0, 3, 4)), index_encoder)
    assert sequence.codes[:, 0].astype(int).tolist() == [1, 1, 2, 2, 2, 5, 6]
    assert sequence.face_found.tolist() == [False, True, True, False, False, True, True]
    assert sequence.frames_without_face.tolist() == [1, 0, 0, 1, 2, 0, 0]


def test_only_the_pose_frames_used_are_encoded(index_video):
    encoded: list[int] = []

    def encoder(crops):
        codes = index_encoder(crops)
        encoded.extend(codes[:, 0].astype(int))
        return codes

    detector = IndexReadingDetector()
    sequence = encode_pose_video(index_video, detector, encoder, frames_needed=3)
    assert detector.seen == list(range(7)) and encoded == [0, 1, 2]  # all aligned for the mean, 3 encoded
    assert sequence.codes_for([0, 1, 2])[:, 0].tolist() == [0, 1, 2]
