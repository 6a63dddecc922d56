"""Benchmark of the call-sized picture (stream/framing.py): what framing one 224x224 frame costs.

For each output size, the variants are timed round-robin (so a burst of load from other users of the
shared CPU hits all alike) on the bundled astronaut photo and its landmark sidecar; the table gives
the median and 90th-percentile ms per frame over --runs, after --warmup. The frame budget at 25 fps is
40 ms; the generator takes most of it.

Variants:
  fit              the crop scaled into the frame, letterboxed
  paste            the crop pasted back into the photo (one warpAffine + one blend over the mask's box)
  paste, 12 MP     the same with the photo upscaled to 4000x3000 first: the per-frame cost must not grow
                   with the photo (it is letterboxed once, at set-up)
  paste, repeat    a repeated slot (the same frame object again): SharedFramer's cache hit
Set-up (letterboxing the photo and warping the mask, once per photo and size) is timed separately.

Usage: python bench/framing.py [--runs 200] [--warmup 20] [--sizes 640x480,1280x720]
Check `uptime` first: the CPU is shared; timings on a loaded machine mean little.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pcavs_live.cli.config import SAMPLE_PHOTO  # noqa: E402
from pcavs.alignment import FaceAligner, read_rgb  # noqa: E402
from pcavs.constants import CROP_SIZE  # noqa: E402
from bench.common import round_robin  # noqa: E402
from stream.framing import FitFramer, PasteFramer, SharedFramer, parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sizes", default="640x480,1280x720")
    args = ap.parse_args()

    photo = read_rgb(SAMPLE_PHOTO)
    face = FaceAligner(None).align_photo_file(SAMPLE_PHOTO)
    # The same face in a 12 MP photo: scale the photo and the alignment together.
    big_scale = 3000 / photo.shape[0]
    big = cv2.resize(photo, (round(photo.shape[1] * big_scale), 3000), interpolation=cv2.INTER_LINEAR)
    big_matrix = face.matrix.copy()
    big_matrix[:, :2] /= big_scale
    crops = [np.random.default_rng(i).integers(0, 256, (CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8) for i in range(8)]

    print(f"cv2 {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads, photo {photo.shape[1]}x{photo.shape[0]}")
    print(f"{'size':>10} | {'variant':<16} | {'median ms':>9} | {'p90 ms':>7}")
    print("-" * 52)
    for text in args.sizes.split(","):
        size = parse_size(text)
        assert size is not None, f"{text}: the native crop needs no framing"
        t = time.perf_counter()
        paste = PasteFramer(photo, face.matrix, size)
        setup_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        paste_big = PasteFramer(big, big_matrix, size)
        setup_big_ms = (time.perf_counter() - t) * 1e3
        fit = FitFramer(size)
        shared = SharedFramer(paste)
        shared(crops[0])
        i = {"n": 0}

        def next_crop() -> np.ndarray:
            i["n"] += 1
            return crops[i["n"] % len(crops)]

        samples = round_robin({
            "fit": lambda: fit(next_crop()),
            "paste": lambda: paste(next_crop()),
            "paste, 12 MP": lambda: paste_big(next_crop()),
            "paste, repeat": lambda: shared(crops[0]),
        }, args.runs, args.warmup)
        for name, values in samples.items():
            p90 = float(np.percentile(values, 90))
            print(f"{text:>10} | {name:<16} | {statistics.median(values):9.3f} | {p90:7.3f}")
        print(f"{text:>10} | {'set-up (once)':<16} | {setup_ms:9.1f} |   (12 MP photo: {setup_big_ms:.1f} ms)")


if __name__ == "__main__":
    main()
