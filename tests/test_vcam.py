"""VirtualCameraSink: exact frames reach a (recording) pyvirtualcam backend in order; missing
v4l2loopback gives the one-line setup command."""
from __future__ import annotations

import os
import platform

import numpy as np
import pytest
import pyvirtualcam
from pyvirtualcam.camera import BACKENDS

from stream.vcam import MODPROBE, VirtualCameraError, VirtualCameraSink


@pytest.fixture
def recording_backend():
    """A pyvirtualcam backend (0.15 interface: keyword-only __init__, send, close, device,
    native_fourcc) that keeps what it is sent; registered under a test-only name and removed after."""
    sent: list[np.ndarray] = []
    created: list[dict] = []
    closed: list[bool] = []

    class RecordingBackend:
        def __init__(self, *, width, height, fps, fourcc, device, **kw):
            if fourcc != pyvirtualcam.util.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value):
                raise RuntimeError("only RGB")
            created.append(dict(width=width, height=height, fps=fps, device=device))
            self._device = device or "/dev/recording0"

        def send(self, frame):
            sent.append(frame.copy())

        def close(self):
            closed.append(True)

        def device(self):
            return self._device

        def native_fourcc(self):
            return None

    name = "pcavs-test-recording"
    pyvirtualcam.register_backend(name, RecordingBackend)
    try:
        yield name, sent, created, closed
    finally:
        BACKENDS.pop(name, None)


def _frames(n: int, h: int = 6, w: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_frames_arrive_exactly_and_in_order(recording_backend):
    name, sent, created, closed = recording_backend
    sink = VirtualCameraSink(device="/dev/video42", backend=name)
    sink.open(4, 6, 25, 16000)
    assert created == [dict(width=4, height=6, fps=25, device="/dev/video42")]
    assert sink.opened_device == "/dev/video42"
    frames = _frames(5)
    audio = np.zeros(640, np.float32)
    for k, f in enumerate(frames):
        sink.write(f, audio, k)
    sink.close()
    assert closed == [True]
    assert len(sent) == 5
    for got, want in zip(sent, frames):
        assert got.dtype == np.uint8 and got.ndim == 1     # the backend gets the flat RGB buffer
        np.testing.assert_array_equal(got.reshape(6, 4, 3), want)


def test_non_contiguous_frame_is_sent_correctly(recording_backend):
    name, sent, _, _ = recording_backend
    sink = VirtualCameraSink(backend=name)
    sink.open(4, 6, 25, 16000)
    big = _frames(1, 12, 8)[0]
    view = big[::2, ::2]                                   # strided view, as a crop would give
    sink.write(view, np.zeros(640, np.float32), 0)
    sink.close()
    np.testing.assert_array_equal(sent[0].reshape(6, 4, 3), view)


def test_wrong_shape_is_rejected(recording_backend):
    name, _, _, _ = recording_backend
    sink = VirtualCameraSink(backend=name)
    sink.open(4, 6, 25, 16000)
    with pytest.raises(ValueError, match="shape"):
        sink.write(np.zeros((5, 4, 3), np.uint8), np.zeros(640, np.float32), 0)
    sink.close()


def test_pacing_is_opt_in(recording_backend, monkeypatch):
    name, _, _, _ = recording_backend
    calls: list[int] = []
    monkeypatch.setattr(pyvirtualcam.Camera, "sleep_until_next_frame", lambda self: calls.append(1))
    for pace, expected in ((False, 0), (True, 3)):
        calls.clear()
        sink = VirtualCameraSink(backend=name, pace=pace)
        sink.open(4, 6, 25, 16000)
        for k, f in enumerate(_frames(3)):
            sink.write(f, np.zeros(640, np.float32), k)
        sink.close()
        assert len(calls) == expected


def test_unknown_backend_is_a_one_line_error():
    with pytest.raises(VirtualCameraError) as info:
        VirtualCameraSink(backend="no-such-backend").open(224, 224, 25, 16000)
    msg = str(info.value)
    assert "no-such-backend" in msg and "\n" not in msg


@pytest.mark.skipif(platform.system() != "Linux", reason="the v4l2loopback message is Linux-specific")
@pytest.mark.skipif(os.path.exists("/sys/module/v4l2loopback"), reason="v4l2loopback is loaded here")
@pytest.mark.parametrize("device", [None, "/dev/video10"])
def test_missing_v4l2loopback_says_how_to_load_it(device):
    sink = VirtualCameraSink(device=device)
    with pytest.raises(VirtualCameraError) as info:
        sink.open(224, 224, 25, 16000)
    msg = str(info.value)
    assert "\n" not in msg
    assert MODPROBE in msg
    assert MODPROBE == 'sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="pcavs-live"'
    assert "apt install v4l2loopback-dkms" in msg
    if device:
        assert device in msg
    sink.close()  # closing a sink that never opened is harmless
