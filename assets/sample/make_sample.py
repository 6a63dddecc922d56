#!/usr/bin/env python3
"""Regenerate the bundled sample (astronaut.png, its landmark sidecar, speech.wav).

The files are committed, so nobody needs to run this; it documents exactly how they were made. The photo
is bit-exact `skimage.data.astronaut()` (the parity oracle's identity image is cut from the same pixels);
the speech depends on the installed espeak-ng version (made with 1.51, Debian 12).

    .venv/bin/python assets/sample/make_sample.py
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
TEXT = "Hello! I am your live avatar. One photo and a microphone are all I need to talk with you."
# Hand-picked anchors in the 512x512 image, the ones the parity oracle aligned with (shared/parity/README.md).
ANCHORS = {"left_eye": [202.5, 102.5], "right_eye": [246.0, 102.5], "mouth": [222.5, 144.0]}


def make_photo() -> None:
    from skimage.data import astronaut

    Image.fromarray(astronaut()).save(HERE / "astronaut.png", format="PNG", optimize=True)
    sidecar = {
        "anchors": ANCHORS,
        # The same three points as an ordered list (left eye, right eye, inner-mouth centre): the form
        # pcavs.alignment.load_landmark_sidecar reads.
        "landmarks": [ANCHORS["left_eye"], ANCHORS["right_eye"], ANCHORS["mouth"]],
    }
    text = json.dumps(sidecar, indent=2)
    text = re.sub(r"\[\s+([-\d.]+),\s+([-\d.]+)\s+\]", r"[\1, \2]", text)  # one [x, y] per line
    (HERE / "astronaut.png.landmarks.json").write_text(text + "\n")


def make_speech() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), TEXT], check=True)
        audio, rate = sf.read(raw, dtype="float64")
    if rate != 22050:
        raise SystemExit(f"espeak-ng wrote {rate} Hz; this script expects 22050 Hz")
    audio = resample_poly(audio, 320, 441)  # 22050 → 16000 Hz, as for shared/parity/cases/speech.wav
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    sf.write(HERE / "speech.wav", pcm, 16000, subtype="PCM_16")


if __name__ == "__main__":
    make_photo()
    make_speech()
    print("wrote", ", ".join(sorted(p.name for p in HERE.iterdir() if p.suffix in (".png", ".json", ".wav"))))
