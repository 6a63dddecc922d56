"""The numbers the PC-AVS model was trained with (spec §3–§5), defined once for the whole project.

Every layer agrees on them (the mel front end, the timeline, the sinks' audio clocks, the pose worker,
the engine's style layout), so they live here, at the bottom of the import graph, and nowhere else.
"""
from __future__ import annotations

from typing import Literal

SAMPLE_RATE = 16000                               # Hz, mono audio everywhere
FPS = 25                                          # output frame rate: one frame per 40 ms slot
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS            # 640 samples of audio per slot
HOP = 160                                         # samples per mel row (10 ms)
N_MELS = 80                                       # mel bands per row
MEL_ROWS_PER_FRAME = SAMPLE_RATE // HOP // FPS    # 4
WINDOW_ROWS = 20                                  # rows per audio-encoder window (5 frames × 4 rows)

CROP_SIZE = 224                                   # aligned face crop and generator output, pixels
ID_DIM = 2048                                     # identity feature (identity encoder)
POSE_DIM = 12                                     # head-pose code (spec §3.2 headpose_embed)
STYLE_DIM = 2560                                  # generator style = [identity | mouth | pose]
MOUTH_DIM = STYLE_DIM - ID_DIM - POSE_DIM         # 500 (spec §3.5)

NoiseMode = Literal["fixed", "random", "zero"]     # generator noise: one draw per session, per frame, none
