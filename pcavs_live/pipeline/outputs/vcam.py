"""`--out vcam`: the virtual camera call apps pick as a webcam (`stream.vcam`), call-sized by default.
With `--out vmic` too, its picture is held back by the microphone's playout delay (`stream.delay`), so
voice and lips reach the call together."""
from __future__ import annotations

from pcavs_live.pipeline.outputs.base import DoctorCheck, Output, OutputContext

CALL_SIZE = (640, 480)  # what call apps expect from a camera (output.size = "auto")
VCAM_LINUX_FIX = ('sudo apt-get install v4l2loopback-dkms && sudo modprobe v4l2loopback devices=1 exclusive_caps=1 '
                  'card_label="pcavs-live"')
VCAM_OBS_FIX = ("install OBS Studio (https://obsproject.com), click Start Virtual Camera once, then Stop "
                "Virtual Camera and close OBS")


def _build(ctx: OutputContext):
    from stream.vcam import VirtualCameraSink
    cam = VirtualCameraSink(device=ctx.config.vcam.device, backend=ctx.config.vcam.backend)
    if ctx.wants("vmic"):  # the voice leaves the microphone playout_delay_s after release
        from stream.delay import DelayedSink
        mic = ctx.sink("vmic")
        return DelayedSink(cam, lambda: mic.playout_delay_s)
    return cam


OUTPUT = Output(name="vcam", live=True, auto_size=CALL_SIZE, build=_build,
                doctor=DoctorCheck("virtual camera", "virtual_camera",
                                   lambda config, system: (config.vcam.device, config.vcam.backend),
                                   lambda config, system: VCAM_LINUX_FIX if system == "Linux" else VCAM_OBS_FIX))
