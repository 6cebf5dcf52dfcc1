"""Inference speed and memory for one 240x240x155 case on this machine (a benchmark, not a test).

Each configuration runs in its own subprocess so that peak RSS is its own. Prints seconds end to end
(read + preprocess + networks + map back), seconds in the networks, slices/s and peak RSS.

    python benchmarks/benchmark_inference.py [--case DIR] [--device cpu] [--repeats 2]

The `paper` preset is timed with freshly initialised weights and a unit mixture: its speed does not
depend on the weights, and no trained paper-size model is bundled.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = REPO.parent / "shared" / "data" / "brats18" / "Brats18_CBICA_AMH_1"


def run_one(model_name: str, case_dir: Path, device: str, repeats: int) -> dict:
    import torch

    from ADMAnomalyLib import api
    from ADMAnomalyLib.cases import find_cases, load_case
    from ADMAnomalyLib.config import preset
    from ADMAnomalyLib.gmm import GMMParams
    from ADMAnomalyLib.infer import predict_prepared
    from ADMAnomalyLib.model import ADMModel
    from ADMAnomalyLib.preprocess import prepare_case

    if model_name == "bundled":
        model = api.load_model(None)
    else:
        model = ADMModel.create(preset(model_name))
        c, d = model.config.model.n_components, model.config.model.feature_dim
        model.gmm = GMMParams(torch.full((c,), 1.0 / c, dtype=torch.float64), torch.zeros(c, d, dtype=torch.float64),
                              torch.eye(d, dtype=torch.float64).repeat(c, 1, 1))
        model.threshold = 0.0
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        case = load_case(find_cases(case_dir)[0])
        prepared = prepare_case(case, model.config.preprocess)
        networks_start = time.perf_counter()
        prediction = predict_prepared(model, prepared, device=device)
        networks_seconds = time.perf_counter() - networks_start
        prediction.anomaly()
        timings.append((time.perf_counter() - start, networks_seconds, prediction.n_slices_processed))
    total, networks, slices = min(timings)
    size = case.images["flair"].GetSize()
    return {
        "model": model_name,
        "device": str(api.resolve_device(device)),
        "threads": torch.get_num_threads(),
        "case_size": list(size),
        "seconds_end_to_end": round(total, 2),
        "seconds_predict": round(networks, 2),
        "slices_with_brain": slices,
        "slices_per_second": round(slices / networks, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder (BraTS names)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per model; the fastest is reported")
    parser.add_argument("--models", nargs="+", default=["bundled", "paper"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.case, args.device, args.repeats)))
        return 0
    print(f"{'model':<10}{'device':<8}{'end-to-end s':>14}{'predict s':>11}{'slices/s':>10}{'peak RSS MiB':>14}")
    for name in args.models:
        output = subprocess.run([sys.executable, __file__, "--child", name, "--case", str(args.case), "--device",
                                 args.device, "--repeats", str(args.repeats)], capture_output=True, text=True,
                                cwd=REPO, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{row['model']:<10}{row['device']:<8}{row['seconds_end_to_end']:>14}{row['seconds_predict']:>11}"
              f"{row['slices_per_second']:>10}{row['peak_rss_mib']:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
