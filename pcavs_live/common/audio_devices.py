"""The one audio-device listing: PortAudio's devices (through sounddevice) as `AudioDevice` rows.

The microphone (capture.audio_sources), the virtual microphone (stream.vmic) and the doctor's probes
(pcavs_live.cli.machine) all list devices; they share this, so that capture and stream stay independent
of each other and the three cannot drift apart. Each caller turns `AudioDevicesUnavailable` into its own
one-line error (what to install or check differs by caller).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pcavs_live.common.errors import UserError

Direction = Literal["input", "output"]


class AudioDevicesUnavailable(UserError):
    """PortAudio cannot be loaded (libportaudio2 missing) or cannot list its devices."""


@dataclass(frozen=True)
class AudioDevice:
    """One PortAudio device as sounddevice lists it; `max_channels` counts the listed direction's channels."""

    index: int
    name: str
    hostapi: str
    max_channels: int
    default_rate: float

    def label(self) -> str:
        return f"{self.index}: {self.name} ({self.hostapi}, {self.max_channels} ch, {self.default_rate:g} Hz)"


def import_sounddevice():
    """The sounddevice module; `AudioDevicesUnavailable` when PortAudio itself cannot be loaded (sounddevice
    raises OSError at import without libportaudio2)."""
    try:
        import sounddevice
    except OSError:
        raise AudioDevicesUnavailable("PortAudio is not installed",
                                      hint="install it (apt install libportaudio2)") from None
    return sounddevice


def list_audio_devices(sd, direction: Direction) -> list[AudioDevice]:
    """The devices of `sd` (the sounddevice module, or a stand-in) with at least one `direction` channel."""
    key = f"max_{direction}_channels"
    try:
        apis = [api["name"] for api in sd.query_hostapis()]
        devices = sd.query_devices()
    except sd.PortAudioError as exc:
        raise AudioDevicesUnavailable(f"cannot query audio devices ({exc})") from None
    return [AudioDevice(int(d["index"]), str(d["name"]), apis[d["hostapi"]] if d["hostapi"] < len(apis) else "?",
                        int(d[key]), float(d["default_samplerate"]))
            for d in devices if d[key] > 0]
