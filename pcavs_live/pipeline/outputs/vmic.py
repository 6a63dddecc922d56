"""`--out vmic`: each slot's own audio to a virtual microphone device (`stream.vmic`); audio only."""
from __future__ import annotations

from pcavs_live.pipeline.outputs.base import DoctorCheck, Output, OutputContext

VB_CABLE_MIC = "CABLE Output"  # Windows, VB-Audio Virtual Cable: what the call app picks as its microphone


def virtual_microphone_fix(system: str) -> str:
    if system == "Windows":
        return (f"install VB-CABLE (https://vb-audio.com/Cable/): unzip, run VBCABLE_Setup_x64.exe as "
                f"administrator, reboot; then pick '{VB_CABLE_MIC}' as the microphone in the call app")
    if system == "Darwin":
        return ("install BlackHole: brew install blackhole-2ch (or the installer from "
                "https://existential.audio/blackhole/); then pick 'BlackHole 2ch' as the microphone in the call app")
    return ("install and start a PulseAudio-compatible sound server: sudo apt-get install pulseaudio "
            "pulseaudio-utils && pulseaudio --start (PipeWire desktops: sudo apt-get install pipewire-pulse "
            "pulseaudio-utils)")


def _build(ctx: OutputContext):
    from stream.vmic import VirtualMicSink
    return VirtualMicSink(device=ctx.config.vmic.device, preroll_ms=ctx.config.vmic.preroll_ms)


OUTPUT = Output(name="vmic", live=True, auto_size=None, build=_build, video=False,
                doctor=DoctorCheck("virtual mic", "virtual_microphone", lambda config, system: (system,),
                                   lambda config, system: virtual_microphone_fix(system)))
