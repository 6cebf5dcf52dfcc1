"""Training throughput, scaling from 1 to N processes, and FLOPs (a benchmark, not a test).

    python benchmarks/benchmark_training.py [--preset small] [--steps 6] [--processes 1 2] [--device cpu]

For each process count it runs CtoC (step 1) and joint (step 2) training steps on random 128x128
slice sets under torchrun (gloo on CPU, nccl on GPU) and prints slice-sets/s per process and in
total. It also counts the FLOPs of one slice set (forward, with torch.utils.flop_counter) for the
`small` and `paper` presets and prints the achieved FLOP/s of inference and training, so the distance
to the machine's peak is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _model_and_batch(preset_name: str, batch: int, device: torch.device):
    from ADMAnomalyLib import api
    from ADMAnomalyLib.config import preset

    config = api.load_model(None).config if preset_name == "bundled" else preset(preset_name)
    size = config.preprocess.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 4, size, size, generator=generator).to(device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    brain = ((yy**2 + xx**2) < 0.8).expand(batch, size, size).contiguous().to(device)
    return config, images * brain.unsqueeze(1), brain


def flops_per_slice_set(preset_name: str) -> dict[str, float]:
    """Forward FLOPs of one slice set, counted by PyTorch: ``ctoc``, CtoC's 4 translations (step 1);
    ``ctoc_residual``, its translations of the density-residual contrasts only (inference and step 2);
    ``dr_de``, DR + DE. ``bundled`` counts the bundled model's architecture."""
    from torch.utils.flop_counter import FlopCounterMode

    from ADMAnomalyLib.networks import ADMNetwork

    config, images, brain = _model_and_batch(preset_name, 1, torch.device("cpu"))
    network = ADMNetwork(config.model).eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as ctoc_counter:
            x_hat = network.translate(images, brain)
        with FlopCounterMode(display=False) as residual_counter:
            network.residual_translation(images, brain)
        with FlopCounterMode(display=False) as rest_counter:
            z, _ = network.features(images, brain, x_hat)
            network.estimator(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    return {"ctoc": ctoc_counter.get_total_flops(), "ctoc_residual": residual_counter.get_total_flops(),
            "dr_de": rest_counter.get_total_flops()}


def matmul_reference(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a large dense matrix product on ``device``: a practical ceiling to compare with."""
    device = torch.device("cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):  # warm-up (thread pools, kernel selection)
        a @ b
    repeats = 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def child(args: argparse.Namespace) -> None:
    from ADMAnomalyLib.distributed import init_from_environment, shutdown
    from ADMAnomalyLib.train import Trainer

    context, device = init_from_environment(args.device)
    if device.type == "cpu" and context.active:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // context.world_size))
    config, images, brain = _model_and_batch(args.preset, config_batch(args), device)
    trainer = Trainer(config, device, show_progress_bar=False, context=context)
    generator = torch.Generator().manual_seed(context.rank)
    results = {}
    for stage in ("ctoc", "joint"):
        def step(*batch):
            return trainer.training_step(stage, *batch)

        step(images, brain, generator)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(images, brain, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[stage] = context.world_size * args.steps * images.shape[0] / (time.perf_counter() - start)
    if context.is_main:
        print(json.dumps({"processes": context.world_size, "threads": torch.get_num_threads(),
                          "ctoc_dtype": str(trainer.ctoc_dtype or torch.float32), **results}))
    shutdown(context)


def config_batch(args: argparse.Namespace) -> int:
    from ADMAnomalyLib.config import preset

    return args.batch_size or preset(args.preset).train.batch_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    print(f"training throughput, preset {args.preset}, batch {config_batch(args)}, device {args.device}")
    print(f"{'processes':>9}{'threads/proc':>14}{'ctoc sets/s':>13}{'per proc':>10}{'joint sets/s':>14}{'per proc':>10}")
    base = {}
    for count in args.processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
                   __file__, "--child", "--preset", args.preset, "--steps", str(args.steps), "--device", args.device]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        output = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=True, cwd=REPO).stdout
        row = json.loads(output.strip().splitlines()[-1])
        base.setdefault("ctoc", row["ctoc"])
        base.setdefault("joint", row["joint"])
        print(f"{count:>9}{row['threads']:>14}{row['ctoc']:>13.1f}{row['ctoc'] / count:>10.1f}"
              f"{row['joint']:>14.1f}{row['joint'] / count:>10.1f}   scaling ctoc x{row['ctoc'] / base['ctoc']:.2f}, "
              f"joint x{row['joint'] / base['joint']:.2f}")
        if count == args.processes[0]:
            single = row

    print("\nFLOPs per slice set (forward) and achieved rates")
    for name in ("small", "paper"):
        flops = flops_per_slice_set(name)
        total = flops["ctoc"] + flops["dr_de"]
        line = f"{name:<6} forward {total / 1e9:7.2f} GFLOP (CtoC {flops['ctoc'] / 1e9:.2f}, DR+DE {flops['dr_de'] / 1e9:.3f})"
        if name == args.preset:
            # Training step 1 = forward + backward of CtoC, about 3x its forward FLOPs.
            line += f"; training CtoC at {single['ctoc']:.1f} sets/s = {3 * flops['ctoc'] * single['ctoc'] / 1e9:.1f} GFLOP/s"
        print(line)
    reference = matmul_reference(args.device, torch.bfloat16 if single.get("bf16") else torch.float32)
    print(f"machine reference: dense matmul {reference:.0f} GFLOP/s "
          f"({'bf16' if single.get('bf16') else 'fp32'}, the training precision here)")
    print("inference rates: combine with slices/s from benchmarks/benchmark_inference.py "
          "(achieved GFLOP/s = forward GFLOP x slices/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
