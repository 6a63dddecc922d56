"""Stand-ins for cluster tests: the studio's paint renderer as a `RenderWorker` backend (picklable by
reference, so a worker process imports it from this module)."""
from __future__ import annotations

from pcavs_live.pipeline.shared_renderer import SharedRenderer
from pcavs_live.pipeline.studio import StudioSessions
from tests.studio_support import AnchorDetector, PaintRenderer, encode_colour


def paint_backend(config):
    """Worker backend: each avatar painted in its photo's colour, no networks."""
    renderer = SharedRenderer(PaintRenderer(0.005)).start()
    return StudioSessions(encode_colour, renderer, config, pose_detector=AnchorDetector), renderer.stop
