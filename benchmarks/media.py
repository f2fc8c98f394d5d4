"""Burst merge (services/media/burst.py) vs OpenCV's fastNlMeansDenoisingColoredMulti, same bursts.

    python -m benchmarks.media [--seeds 1 2] [--tune-seed 0] [--repeats 3]

The protocol of ../shared/research/photo.md section 4.1 (services/media/synthetic.py): 8-frame
1024x768 bursts cut from a 2x2 mosaic of scikit-image photos at native resolution, reference frame
3, +-6 px / +-0.5 deg camera motion, two smooth local warps, a textured disk moving (4, 2) px per
frame, Poisson + Gaussian noise in the sRGB domain at two levels (mid: sigma ~ 8.8/255 at mid-grey,
high: ~ 19/255), quantised to 8 bits.

- **OpenCV**: NLM-multi with a 7-frame temporal window, 7x7 patches, 21x21 search, hColor = h
  (research/photo.md: hColor = h is optimal). h is tuned per noise level by a small sweep on the
  tuning seed, which is not reported; the best h is then run on the test seeds.
- **ours**: merge_burst with the reference given (the synthetic truth is frame 3), and the same
  pipeline without its final spatial Wiener filter ("robust mean" ablation, our own baseline).

PSNR on 8-bit RGB with a 16 px border crop, overall and inside the moving disk at the reference
position (ghosting shows there). Times are wall clock in this process with OpenCV's default thread
count (2 on the CI-sized machine): best of `--repeats` runs for ours, best of the test-seed runs for
OpenCV (one run per seed: a run takes ~10 s). The machine is shared with other work: the load
average before and after is recorded, and ratios measured in the same run are the figure to trust.
Results go to benchmarks/results/media.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import scipy

from services.media import burst as burst_merge
from services.media.align import FLOW_PREBLUR_SIGMA, dense_flow, to_gray8, warp_by_flow
from services.media.synthetic import make_burst, mosaic_scene, psnr

RESULTS = Path(__file__).resolve().parent / "results" / "media.json"
SHAPE = (768, 1024)
NUM_FRAMES = 8
NLM_SWEEP = {"mid": (3.5, 4.2, 5.0, 6.0), "high": (7.0, 9.0, 11.0, 13.0)}
TARGETS_DB = {"mid": 3.0, "high": 4.0}  # over tuned OpenCV, from issue 7
TARGET_SPEEDUP = 5.0


def nlm_multi(frames: list[np.ndarray], reference: int, h: float) -> tuple[np.ndarray, float]:
    bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]
    started = time.perf_counter()
    out = cv2.fastNlMeansDenoisingColoredMulti(bgr, reference, 7, None, h, h, 7, 21)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB), time.perf_counter() - started


def ours(frames: list[np.ndarray], reference: int, repeats: int) -> tuple[dict, float]:
    floats = [f.astype(np.float32) / 255.0 for f in frames]
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = burst_merge.merge_burst(floats, reference)
        times.append(time.perf_counter() - started)
    # the ablation: the same alignment and robust mean, no spatial Wiener filter
    ref = floats[reference]
    variance = burst_merge.estimate_noise(ref).variance(ref)
    gray = to_gray8(ref, FLOW_PREBLUR_SIGMA)
    aligned = [
        warp_by_flow(f, dense_flow(gray, to_gray8(f, FLOW_PREBLUR_SIGMA)))
        for i, f in enumerate(floats)
        if i != reference
    ]
    robust_mean, _ = burst_merge.robust_merge(ref, aligned, variance)
    return {"ours": result.image, "robust_mean": np.clip(robust_mean, 0, 1), "stats": result.stats}, min(
        times
    )


def scores(image, b) -> dict:
    return {
        "psnr": round(psnr(image, b.truth), 2),
        "psnr_moving": round(psnr(image, b.truth, b.moving_mask), 2),
    }


def run_level(scene, level: str, seeds: list[int], tune_seed: int, repeats: int) -> dict:
    tune = make_burst(scene, NUM_FRAMES, SHAPE, level, tune_seed)
    sweep = {}
    for h in NLM_SWEEP[level]:
        out, seconds = nlm_multi(tune.frames, tune.reference, h)
        sweep[h] = {**scores(out, tune), "seconds": round(seconds, 2)}
        print(f"  tune {level} h={h}: {sweep[h]}", flush=True)
    best_h = max(sweep, key=lambda h: sweep[h]["psnr"])
    per_seed, nlm_times, our_times = [], [], []
    for seed in seeds:
        b = make_burst(scene, NUM_FRAMES, SHAPE, level, seed)
        nlm, nlm_seconds = nlm_multi(b.frames, b.reference, best_h)
        mine, our_seconds = ours(b.frames, b.reference, repeats)
        row = {
            "seed": seed,
            "noisy_reference": scores(b.frames[b.reference], b),
            "opencv_nlm_multi": scores(nlm, b),
            "ours": scores(mine["ours"], b),
            "ours_robust_mean_only": scores(mine["robust_mean"], b),
            "opencv_seconds": round(nlm_seconds, 2),
            "ours_seconds": round(our_seconds, 2),
            "ours_stats": {k: round(v, 3) for k, v in mine["stats"].items()},
        }
        print(f"  {level} seed {seed}: {row}", flush=True)
        per_seed.append(row)
        nlm_times.append(nlm_seconds)
        our_times.append(our_seconds)
    return summarize(level, best_h, sweep, per_seed, min(nlm_times), min(our_times))


def summarize(level, best_h, sweep, per_seed, nlm_seconds, our_seconds) -> dict:
    def mean(method, key):
        return round(statistics.mean(r[method][key] for r in per_seed), 2)

    summary = {
        method: {"psnr": mean(method, "psnr"), "psnr_moving": mean(method, "psnr_moving")}
        for method in ("noisy_reference", "opencv_nlm_multi", "ours", "ours_robust_mean_only")
    }
    gain = round(summary["ours"]["psnr"] - summary["opencv_nlm_multi"]["psnr"], 2)
    gain_moving = round(summary["ours"]["psnr_moving"] - summary["opencv_nlm_multi"]["psnr_moving"], 2)
    speedup = round(nlm_seconds / our_seconds, 2)
    return {
        "noise": level,
        "opencv_h": best_h,
        "opencv_sweep_on_tuning_seed": {str(h): v for h, v in sweep.items()},
        "mean_over_seeds": summary,
        "gain_over_opencv_db": gain,
        "gain_over_opencv_moving_db": gain_moving,
        "opencv_best_seconds": round(nlm_seconds, 2),
        "ours_best_seconds": round(our_seconds, 2),
        "speedup": speedup,
        "targets": {
            "gain_db": TARGETS_DB[level],
            "gain_met": gain >= TARGETS_DB[level],
            "moving_no_loss_met": gain_moving >= 0,
            "speedup": TARGET_SPEEDUP,
            "speedup_met": speedup >= TARGET_SPEEDUP,
        },
        "per_seed": per_seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", nargs="+", default=["mid", "high"], choices=["mid", "high"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = [f"{x:.2f}" for x in os.getloadavg()]
    machine = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "opencv_threads": cv2.getNumThreads(),
        "load_average_before": load_before,
    }
    print(f"machine: {machine}", flush=True)
    scene = mosaic_scene()
    levels = [run_level(scene, level, args.seeds, args.tune_seed, args.repeats) for level in args.levels]
    report = {
        "benchmark": "burst merge vs OpenCV fastNlMeansDenoisingColoredMulti (8 x 1024x768)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.media " + " ".join(sys.argv[1:]),
        "machine": machine,
        "load_average_after": [f"{x:.2f}" for x in os.getloadavg()],
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "scipy": scipy.__version__,
        },
        "note": (
            "One run on a shared 2-core VM (other engineers' jobs ran beside it: see the load averages); "
            "PSNR is deterministic, times are indicative and their ratio, measured in the same run, is "
            "the figure to trust. Test seeds are not the tuning seed."
        ),
        "levels": levels,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(levels)
    print(f"wrote {args.out}")


def print_table(levels: list[dict]) -> None:
    print(f"\n{'noise':6s} {'method':24s} {'PSNR':>7s} {'moving':>7s} {'seconds':>8s}")
    for level in levels:
        s = level["mean_over_seeds"]
        for method, seconds in (
            ("noisy_reference", ""),
            ("opencv_nlm_multi", level["opencv_best_seconds"]),
            ("ours", level["ours_best_seconds"]),
            ("ours_robust_mean_only", ""),
        ):
            psnr_all, psnr_moving = s[method]["psnr"], s[method]["psnr_moving"]
            print(f"{level['noise']:6s} {method:24s} {psnr_all:7.2f} {psnr_moving:7.2f} {seconds!s:>8s}")
        print(
            f"{level['noise']:6s} gain {level['gain_over_opencv_db']:+.2f} dB (moving "
            f"{level['gain_over_opencv_moving_db']:+.2f}), speedup x{level['speedup']}, "
            f"targets {level['targets']}"
        )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
