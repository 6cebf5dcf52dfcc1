"""Time to load the next case with stored results in the Slicer module's case browser (a benchmark,
not a test).

Predicts ``--count`` real 240x240x155 cases with the bundled model through the engine API into a
temporary results folder (``api.predict_folder``, which also writes ``cases.csv``), opens the folder
with the module's logic on a real MRML scene (PyPI ``slicer-core``, three slice views) and steps
Next / Previous through it: every step loads four volumes, the reference label as a segmentation, the
stored energy map and the anomaly segmentation, and removes the previous case's nodes. Prints the
seconds of each step (wall clock and CPU; the first load, which imports the engine, separately),
the median and the slowest, the machine's load average, and the process RSS after each round (it stays flat when nothing is left behind).

    python benchmarks/benchmark_case_browser.py [--cases ../shared/data/brats18] [--count 3] [--rounds 3]
                                                [--results DIR]

Nothing is written outside a temporary folder (or ``--results``); the data folder is only read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "ADMAnomaly"), str(REPO)]
DEFAULT_CASES = REPO.parent / "shared" / "data" / "brats18"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="folder of BraTS-style case folders")
    parser.add_argument("--count", type=int, default=3, help="cases to predict and browse (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="Next through the cases and Previous back, N times")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path,
                        help="results folder to keep between runs (cases done there are not predicted again)")
    args = parser.parse_args()

    from ADMAnomalyCore.logic import ADMAnomalyCoreLogic
    from ADMAnomalyCore.standalone import StandaloneScene
    from ADMAnomalyLib import api

    folders = sorted(p for p in args.cases.iterdir() if p.is_dir() and not p.name.startswith("."))[: args.count]
    if len(folders) < 2:
        parser.error(f"{args.cases}: need at least 2 case folders")
    with tempfile.TemporaryDirectory(prefix="ADMAnomaly-browser-") as work:
        cases, output = Path(work) / "cases", args.results or Path(work) / "results"
        cases.mkdir()
        for folder in folders:  # links: only these cases are found, nothing is copied
            (cases / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
        start = time.perf_counter()
        report = api.predict_folder(None, cases, output, device=args.device)
        print(f"predicted {len(report.done)} cases with the bundled model in {time.perf_counter() - start:.1f} s "
              f"({len(report.skipped)} done before; {', '.join(report.failed) or 'no failure'})")

        mrml = StandaloneScene()
        for _ in range(3):  # the slice views of the application's layout
            mrml.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        logic = ADMAnomalyCoreLogic()
        rows = logic.openFolder(cases, output)
        start = time.perf_counter()
        loaded = logic.nextCase()
        first = time.perf_counter() - start
        size = loaded.volumes["flair"].GetImageData().GetDimensions()
        print(f"case size {size[0]}x{size[1]}x{size[2]}; {len(rows)} cases; first load (imports the engine) "
              f"{first:.2f} s; RSS {rss_mib():.0f} MiB")
        steps, cpu = [], []
        for round_number in range(1, args.rounds + 1):
            # Next from the first case to the last, Previous back to the first.
            for step in [logic.nextCase] * (len(rows) - 1) + [logic.previousCase] * (len(rows) - 1):
                start, start_cpu = time.perf_counter(), time.process_time()
                loaded = step()
                steps.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                print(f"  {loaded.caseId}: {steps[-1]:.2f} s (CPU {cpu[-1]:.2f} s)")
            print(f"round {round_number}: RSS {rss_mib():.0f} MiB, scene nodes {mrml.scene.GetNumberOfNodes()}")
        print(f"next case with stored results: median {statistics.median(steps):.2f} s, slowest {max(steps):.2f} s "
              f"over {len(steps)} loads (target <= 2 s); CPU time median {statistics.median(cpu):.2f} s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        logic.closeFolder()
        mrml.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
