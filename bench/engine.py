"""Benchmark of the per-frame engine: ms/frame per stage at batch 1 and 8, identity set-up cost.

Prints a table (medians over --runs after --warmup) and the ratio against the upstream PC-AVS costs
measured on the same kind of 2-core CPU (shared/parity/README.md, "Timing"): upstream runs the
generator twice and re-encodes the identity per batch, so its per-frame figure is the one to beat.

Usage: python bench/engine.py [--checkpoints DIR] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
Without real checkpoints, generate stand-ins: python ../shared/parity/make_weights.py --seed 0 --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_network_args, load_for_bench, median_ms  # noqa: E402
from pcavs.engine import Avatar, EngineOptions  # noqa: E402
from pcavs.runtime import RenderRuntime  # noqa: E402

# Upstream figures (ms/frame, B=1 median / B=16) from shared/parity/README.md, same 2-core CPU, fp32.
UPSTREAM_MS = {"pose": (92, 386), "audio": (21, 68), "generator": (740, 2040), "identity": (71, 257),
               "total": (1803, 3453)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_args(ap)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    nets, device, dtype = load_for_bench(args)
    rng = np.random.default_rng(0)
    photo = torch.from_numpy(rng.uniform(-1, 1, (3, 224, 224)).astype(np.float32))
    options = EngineOptions(device=device, dtype=dtype)

    runtime = RenderRuntime(nets)
    identity_ms = median_ms(lambda: Avatar(runtime, photo, options), args.runs, args.warmup, device)
    avatar = Avatar(runtime, photo, options)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        poses_in = torch.from_numpy(rng.uniform(-1, 1, (b, 3, 224, 224)).astype(np.float32)).to(device, dtype)
        mels = rng.uniform(0, 1, (b, 1, 80, 20)).astype(np.float32)
        codes = rng.normal(size=(b, 12)).astype(np.float32)
        rest = avatar.frame_style(avatar.mouth_codes(mels), codes)
        start = avatar.id_map[None]
        noise = avatar.noise.for_batch(b)

        def pose_stage() -> object:
            with torch.inference_mode():
                return nets.pose.pose_code(poses_in)

        def gen_stage() -> object:
            with torch.inference_mode():
                return nets.generator.forward_cached(avatar.identity_style, rest, start, noise)

        pose = median_ms(pose_stage, args.runs, args.warmup, device) / b
        audio = median_ms(lambda: avatar.mouth_codes(mels), args.runs, args.warmup, device) / b
        gen = median_ms(gen_stage, args.runs, args.warmup, device) / b
        total = median_ms(lambda: (pose_stage(), avatar.render(mels, codes)), args.runs, args.warmup, device) / b
        rows.append((b, pose, audio, gen, total))

    # The straightforward fp32 eager path (upstream's grouped-conv generator, NCHW, whole batch), same run:
    # what the speed work is measured against (issue "Speed": live path <= 0.25x of this).
    g = nets.generator
    saved = (g.shared_weight, g.channels_last, g.max_batch)
    g.shared_weight, g.channels_last, g.max_batch = False, False, None
    mels1 = rng.uniform(0, 1, (1, 1, 80, 20)).astype(np.float32)
    pose1 = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)).to(device, dtype)
    codes1 = rng.normal(size=(1, 12)).astype(np.float32)

    def reference_frame() -> object:
        with torch.inference_mode():
            nets.pose.pose_code(pose1)
        return avatar.render(mels1, codes1)

    reference = median_ms(reference_frame, args.runs, args.warmup, device)
    g.shared_weight, g.channels_last, g.max_batch = saved

    print(f"\npcavs-live engine bench — device {device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, medians of {args.runs} runs after {args.warmup} warm-ups")
    print(f"identity set-up (V + reference pose, once per photo): {identity_ms:.1f} ms "
          f"(upstream pays {UPSTREAM_MS['identity'][0]} ms for V on every batch)\n")
    header = f"{'batch':>5} | {'pose ms/f':>9} | {'audio ms/f':>10} | {'generator ms/f':>14} | {'total ms/f':>10} | " \
             f"{'upstream ms/f':>13} | {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for b, pose, audio, gen, total in rows:
        up = UPSTREAM_MS["total"][0] if b == 1 else UPSTREAM_MS["total"][1]
        print(f"{b:>5} | {pose:>9.1f} | {audio:>10.1f} | {gen:>14.1f} | {total:>10.1f} | {up:>13} | {up / total:>7.2f}x")
    live = rows[0][4] if rows and rows[0][0] == 1 else float("nan")
    print(f"\nstraightforward fp32 eager path (grouped-conv G, NCHW), B=1: {reference:.1f} ms/frame; "
          f"live path / straightforward = {live / reference:.3f}")
    print("\n(total = pose encoder + audio encoder + one generator pass + uint8 conversion; upstream total = "
          "V + A + 2×E + 2×G per frame, B=1 and B=16 figures from shared/parity/README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
