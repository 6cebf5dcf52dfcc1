"""Inference speed and memory for one 240x240x155 case on this machine (a benchmark, not a test).

Each configuration runs in its own subprocess so that peak RSS is its own. Prints seconds end to end
(read + preprocess + networks + post-processing + map back), seconds of the prediction step
(everything after preprocessing), slices/s, peak RSS and, on a GPU,
peak GPU memory; then the forward FLOPs per slice set and the FLOP/s achieved in the prediction step.
The fastest of ``--repeats`` runs is reported, so with ``--compile`` or on a GPU it is a warmed-up run.

    python benchmarks/benchmark_inference.py [--case DIR] [--device cpu|cuda] [--repeats 2]
                                             [--precision auto|fp32|bf16|fp16] [--compile]

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


def run_one(model_name: str, case_dir: Path, device: str, repeats: int, precision: str, compile: bool) -> dict:
    import torch

    from ADMAnomalyLib import api
    from ADMAnomalyLib.cases import find_cases, load_case
    from ADMAnomalyLib.config import preset
    from ADMAnomalyLib.gmm import GMMParams
    from ADMAnomalyLib.infer import InferenceOptions, energy_volume
    from ADMAnomalyLib.model import ADMModel
    from ADMAnomalyLib.infer import anomaly_mask, prepare_for_model
    from ADMAnomalyLib.preprocess import native_brain_mask

    if model_name == "bundled":
        model = api.load_model(None)
    else:
        model = ADMModel.create(preset(model_name))
        c, d = model.config.model.n_components, model.config.model.feature_dim
        model.gmm = GMMParams(torch.full((c,), 1.0 / c, dtype=torch.float64), torch.zeros(c, d, dtype=torch.float64),
                              torch.eye(d, dtype=torch.float64).repeat(c, 1, 1))
        model.threshold = 0.0
    on_gpu = api.resolve_device(device).type == "cuda"
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        case = load_case(find_cases(case_dir)[0])
        prepared = prepare_for_model(model, case)
        predict_start = time.perf_counter()
        energy = energy_volume(model, prepared, InferenceOptions(device, precision, compile=compile))
        if on_gpu:
            torch.cuda.synchronize()
        predict_seconds = time.perf_counter() - predict_start
        anomaly_mask(energy, native_brain_mask(prepared), model.threshold,
                     model.config.postprocess.min_component_mm3)
        timings.append((time.perf_counter() - start, predict_seconds, int(prepared.has_brain.sum())))
    total, predict_seconds, slices = min(timings)
    size = case.images["flair"].GetSize()
    return {
        "model": model_name,
        "device": str(api.resolve_device(device)),
        "precision": precision + (" compiled" if compile else ""),
        "threads": torch.get_num_threads(),
        "case_size": list(size),
        "seconds_end_to_end": round(total, 2),
        "seconds_predict": round(predict_seconds, 2),
        "slices_with_brain": slices,
        "slices_per_second": round(slices / predict_seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="case folder (BraTS names)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per model; the fastest is reported")
    parser.add_argument("--models", nargs="+", default=["bundled", "paper"])
    parser.add_argument("--precision", default="auto", help="auto (half on GPU, fp32 on CPU), fp32, bf16 or fp16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the CtoC network")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.case, args.device, args.repeats, args.precision, args.compile)))
        return 0
    from benchmark_training import flops_per_slice_set, matmul_reference

    print(f"{'model':<10}{'device':<8}{'precision':<15}{'end-to-end s':>14}{'predict s':>11}{'slices/s':>10}"
          f"{'peak RSS MiB':>14}{'peak GPU MiB':>14}{'GFLOP/slice':>13}{'GFLOP/s':>10}")
    for name in args.models:
        command = [sys.executable, __file__, "--child", name, "--case", str(args.case), "--device", args.device,
                   "--repeats", str(args.repeats), "--precision", args.precision]
        output = subprocess.run(command + (["--compile"] if args.compile else []), capture_output=True, text=True, encoding="utf-8",
                                cwd=REPO, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        flops = flops_per_slice_set(name)
        per_slice = (flops["ctoc_residual"] + flops["dr_de"]) / 1e9
        gpu = "-" if row["peak_gpu_mib"] is None else row["peak_gpu_mib"]
        print(f"{row['model']:<10}{row['device']:<8}{row['precision']:<15}{row['seconds_end_to_end']:>14}"
              f"{row['seconds_predict']:>11}{row['slices_per_second']:>10}{row['peak_rss_mib']:>14}{gpu:>14}"
              f"{per_slice:>13.2f}{per_slice * row['slices_per_second']:>10.1f}")
    print("GFLOP/s = forward network FLOPs per slice set x slices/s of the prediction step (which also "
          "includes the mixture, the mapping back and any post-processing)")
    import torch

    references = {name: matmul_reference(args.device, dtype) for name, dtype in
                  (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
                  if name == "fp32" or args.device.startswith("cuda") or args.precision == name}
    print("machine reference (dense matmul, the practical ceiling): "
          + ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in references.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
