"""Virtual webcam output: the avatar appears as a camera in Zoom/Meet/OBS (pyvirtualcam).

Video only: a virtual camera carries no sound. The voice reaches a call through the virtual microphone
(stream/vmic.py, `--out vmic`); the session then delays this camera by the microphone's playout delay
(stream/delay.py) so that lips and voice arrive together. Call-sized pictures (640x480, 720p) come from
stream/framing.py in front of this sink.

Pacing: the scheduler already delivers frames on the audio clock, one per 40 ms slot, so by default
`write` sends and returns at once. `pace=True` additionally calls pyvirtualcam's
`sleep_until_next_frame()`, which only makes sense when the caller does *not* pace (a bare loop
pushing frames as fast as it can); with the scheduler it would add up to a frame of sleep per write
and make the loop fall behind its own clock.
"""
from __future__ import annotations

import platform

import numpy as np

from pcavs_live.common.errors import UserError

MODPROBE = 'sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label="pcavs-live"'


class VirtualCameraError(UserError):
    """No usable virtual camera; the message is one line saying how to get one."""


def _setup_hint(system: str, device: str | None = None) -> str:
    """What the user has to do on this OS to get a virtual camera device."""
    if system == "Linux":
        nr = device[len("/dev/video"):] if device and device.startswith("/dev/video") else ""
        pin = f" (append video_nr={nr} to get {device})" if nr.isdigit() else ""
        return (f"load the v4l2loopback kernel module: {MODPROBE}{pin} "
                "(install it first with: sudo apt install v4l2loopback-dkms)")
    if system in ("Windows", "Darwin"):
        return ("install OBS Studio (https://obsproject.com), start its virtual camera once "
                "(Start Virtual Camera), stop it again, then retry")
    return f"virtual cameras are not supported by pyvirtualcam on {system}"


class VirtualCameraSink:
    """FrameSink that sends each RGB frame to a virtual camera device; the audio is ignored.

    `device`: e.g. "/dev/video10" (Linux) or "OBS Virtual Camera"; None picks the first available.
    `backend`: a pyvirtualcam backend name ("v4l2loopback", "obs", "unitycapture") or None for auto.
    """

    def __init__(self, device: str | None = None, backend: str | None = None, pace: bool = False) -> None:
        self.device = device or None
        self.backend = backend or None
        self.pace = pace
        self._cam = None  # pyvirtualcam.Camera while open

    def open(self, width: int, height: int, fps: int, sample_rate: int) -> None:
        import pyvirtualcam
        from pyvirtualcam.camera import BACKENDS

        if self.backend is not None and self.backend not in BACKENDS:
            # Checked here because pyvirtualcam raises a bare KeyError for an unknown name.
            known = ", ".join(sorted(BACKENDS)) or "none on this system"
            raise VirtualCameraError(f"unknown virtual camera backend '{self.backend}' (available: {known}); "
                                     + _setup_hint(platform.system()))
        if self.backend is None and not BACKENDS:
            raise VirtualCameraError(f"no virtual camera backend available; {_setup_hint(platform.system())}")
        try:
            self._cam = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                            device=self.device, backend=self.backend)
        except Exception as exc:  # pyvirtualcam reports every backend's failure as one RuntimeError
            reason = "; ".join(" ".join(line.split()).rstrip(" .;")
                               for line in str(exc).splitlines() if line.strip())
            where = f"virtual camera {self.device!r}" if self.device else "a virtual camera"
            raise VirtualCameraError(f"cannot open {where}: {reason or type(exc).__name__}; "
                                     f"{_setup_hint(platform.system(), self.device)}") from None

    @property
    def opened_device(self) -> str | None:
        """The device actually in use (what to pick in the video-call app)."""
        return None if self._cam is None else self._cam.device

    def write(self, frame: np.ndarray, audio: np.ndarray, frame_index: int) -> None:
        if self._cam is None:
            raise VirtualCameraError("VirtualCameraSink.write called before open()")
        self._cam.send(np.ascontiguousarray(frame))  # pyvirtualcam checks dtype and shape
        if self.pace:
            self._cam.sleep_until_next_frame()

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            cam.close()
