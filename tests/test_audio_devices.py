"""The one audio-device listing (pcavs_live.common.audio_devices), on a stand-in for sounddevice: inputs
and outputs from the same table, unknown host APIs shown as "?", a PortAudio failure as one line that each
caller words for itself."""
from __future__ import annotations

import pytest

from capture.audio_sources import AudioDeviceError, SoundDeviceBackend
from pcavs_live.common.audio_devices import AudioDevice, AudioDevicesUnavailable, list_audio_devices
from stream.vmic import SoundDeviceOutput, VirtualMicError


class FakeSD:
    class PortAudioError(Exception):
        pass

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def query_hostapis(self, index=None):
        apis = [{"name": "ALSA", "default_input_device": 0}]
        return apis if index is None else apis[index]

    def query_devices(self):
        if self.fail:
            raise self.PortAudioError("Error querying device -1")
        return [
            {"index": 0, "name": "Built-in Mic", "hostapi": 0, "max_input_channels": 2, "max_output_channels": 0,
             "default_samplerate": 48000.0},
            {"index": 1, "name": "Speakers", "hostapi": 0, "max_input_channels": 0, "max_output_channels": 2,
             "default_samplerate": 44100.0},
            {"index": 2, "name": "Headset", "hostapi": 5, "max_input_channels": 1, "max_output_channels": 2,
             "default_samplerate": 16000.0},
        ]


def test_inputs_and_outputs_come_from_one_table():
    sd = FakeSD()
    assert list_audio_devices(sd, "input") == [AudioDevice(0, "Built-in Mic", "ALSA", 2, 48000.0),
                                               AudioDevice(2, "Headset", "?", 1, 16000.0)]
    assert list_audio_devices(sd, "output") == [AudioDevice(1, "Speakers", "ALSA", 2, 44100.0),
                                                AudioDevice(2, "Headset", "?", 2, 16000.0)]
    assert AudioDevice(2, "Headset", "?", 1, 16000.0).label() == "2: Headset (?, 1 ch, 16000 Hz)"


def test_a_portaudio_failure_is_one_line_each_caller_words_for_itself():
    with pytest.raises(AudioDevicesUnavailable, match=r"^cannot query audio devices \(Error querying device -1\)$"):
        list_audio_devices(FakeSD(fail=True), "input")
    mic = SoundDeviceBackend.__new__(SoundDeviceBackend)
    mic._sd = FakeSD(fail=True)
    with pytest.raises(AudioDeviceError, match="cannot query audio devices"):
        mic.input_devices()
    out = SoundDeviceOutput.__new__(SoundDeviceOutput)
    out._sd = FakeSD(fail=True)
    with pytest.raises(VirtualMicError, match="cannot list audio output devices"):
        out.output_devices()
    mic._sd = out._sd = FakeSD()
    assert [d.name for d in mic.input_devices()] == ["Built-in Mic", "Headset"]
    assert [d.name for d in out.output_devices()] == ["Speakers", "Headset"]
