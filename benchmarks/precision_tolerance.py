"""How far reduced-precision inference is from fp32 (a measurement, not a test).

Runs the bundled model on the central brain slices of the bundled MS case in fp32, bf16 and fp16
and prints, relative to the standard deviation of the fp32 energy over the brain, the median, 99th
percentile and maximum |ΔE|, and the fraction of brain pixels that change side of the 98th
percentile threshold; plus the seconds each precision took. Testing/Python/test_inference_options.py
asserts the stated tolerance on the same data.

    python benchmarks/precision_tolerance.py [--slices 24] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ADMAnomalyLib import api  # noqa: E402
from ADMAnomalyLib.cases import find_cases, load_case  # noqa: E402
from ADMAnomalyLib.demo import demo_case_dir  # noqa: E402
from ADMAnomalyLib.infer import InferenceOptions, energy_slices  # noqa: E402
from ADMAnomalyLib.preprocess import prepare_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=24, help="central brain slices of the demo case")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = api.load_model(None)
    device = api.resolve_device(args.device)
    prepared = prepare_case(load_case(find_cases(demo_case_dir())[0]), model.config.preprocess)
    with_brain = np.flatnonzero(prepared.has_brain)
    middle = with_brain[max(0, len(with_brain) // 2 - args.slices // 2):][: args.slices]
    images, brain = prepared.slices[middle], prepared.brain[middle]
    energies, seconds = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        options = InferenceOptions(device, precision)
        energy_slices(model, images[:2], brain[:2], options)  # warm-up
        start = time.perf_counter()
        energies[precision] = energy_slices(model, images, brain, options)[brain]
        seconds[precision] = time.perf_counter() - start
    reference = energies["fp32"]
    spread = float(reference.std())
    threshold = np.percentile(reference, 98)
    print(f"{len(middle)} slices, energy sd over the brain {spread:.3f}; differences in % of that sd")
    print(f"{'precision':<10}{'seconds':>9}{'median':>9}{'p99':>9}{'max':>9}{'crossing 98th pct':>19}")
    for precision, values in energies.items():
        difference = np.abs(values - reference) / spread * 100
        crossing = np.mean((values >= threshold) != (reference >= threshold)) * 100
        print(f"{precision:<10}{seconds[precision]:>9.2f}{np.median(difference):>8.3f}%"
              f"{np.percentile(difference, 99):>8.3f}%{difference.max():>8.3f}%{crossing:>18.4f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
