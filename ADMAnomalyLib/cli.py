"""Command line: ``admanomaly train | cache | predict | threshold | calibrate | evaluate | study | demo | info``, mirroring
the Python API (ADMAnomalyLib.api).

Exit codes (one rule: the code says whether the command could start, and whether every case of it
succeeded):
  0    success
  1    unexpected internal error (a bug: please report it with the command)
  2    bad usage or input that stops the command before any case runs (a bad option, an input path
       that does not exist, no case found in it)
  3    unusable model file
  4    output not writable (folder, full disk)
  5    compute device unavailable
  6    one or more cases failed; the others were written (see errors.log and cases.csv), also
       when the folder held a single case
  130  cancelled (Ctrl-C, SIGTERM); outputs of finished cases are kept, nothing half-written
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from .config import PRECISIONS, PRESETS, PROFILES
from .errors import ADMError, InputError
from .validation import check_positive_int, check_threshold, parse_shard

EXIT_PARTIAL = 6
EXIT_INTERRUPTED = 130


def _argument_type(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a :mod:`~ADMAnomalyLib.validation` check, so that the CLI and the
    API refuse the same values with the same words (argparse exits 2)."""

    def convert(text: str) -> Any:
        try:
            return check(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_POSITIVE = {name: _argument_type(lambda text, name=name: check_positive_int(text, name))
             for name in ("batch size", "workers", "epochs", "components", "seed", "lesion margin", "folds",
                          "image size", "cases")}
_THRESHOLD = _argument_type(check_threshold)
_SHARD = _argument_type(lambda text: "{}/{}".format(*parse_shard(text)))


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _THRESHOLD(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, not {text!r}")
    return value


def _add_postprocess_settings(parser: argparse.ArgumentParser, needs_threshold: bool = True) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="postprocess.FIELD=VALUE",
                        help="other post-processing than the model's, without retraining, e.g. "
                             "--set postprocess.flair_weight=0 (the model's own evidence) or "
                             "--set preprocess.native_bias_correction_levels=2 (N4 of the FLAIR it reads) or "
                             "--set preprocess.max_slice_mm=0 (thick slices as they are)"
                             + ("; needs --threshold for the anomaly maps, except postprocess.min_component_mm3 (the "
                                "label's smallest region, mm³), which leaves the energy as it was" if needs_threshold else ""))


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu or cuda (default: auto)")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="progress as a bar on stderr, JSON lines on stdout (for GUIs), or nothing")


def _parse_pattern(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    pattern = {}
    for item in items:
        key, sep, glob = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--pattern expects KEY=GLOB, got {item!r}")
        pattern[key.strip()] = glob.strip()
    return pattern


def _add_pattern(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", action="append", metavar="KEY=GLOB",
                        help="per-contrast file pattern inside each case folder, e.g. --pattern flair='FLAIR_*' "
                             "(keys: flair, t1, t1c, t2, label, mask); default: BraTS 2018/19 and 2023 names")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``admanomaly`` command."""
    parser = argparse.ArgumentParser(
        prog="admanomaly",
        description="Unsupervised pixel-wise anomaly detection in multi-contrast brain MRI (ADM network). "
                    "'admanomaly COMMAND --help' documents each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model on the normal slices of a folder of cases")
    train.add_argument("data_dir", type=Path,
                       help="folder of cases (lesion labels optional), a domains file (.json: several folders, "
                            "see benchmarks/domains.json) or a slice cache")
    train.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.admm)")
    train.add_argument("--preset", choices=sorted(PRESETS), default="small", help="size preset (default: small)")
    train.add_argument("--profile", choices=sorted(PROFILES), default="faithful",
                       help="faithful = the paper's ADM; transfer = the bundled model's configuration for other "
                            "sites and pathologies (robust normalisation, site augmentation, CtoC uncertainty, only the "
                            "FLAIR residual in the density features, post-processing) (default: faithful)")
    train.add_argument("--ctoc-from", metavar="MODEL",
                       help="take the CtoC (step 1) of a trained model ('default' = bundled) and train step 2 only; "
                            "its preset and profile must be this one's")
    train.add_argument("--epochs-ctoc", type=_non_negative_int, help="epochs of step 1 (CtoC)")
    train.add_argument("--epochs-joint", type=_non_negative_int, help="epochs of step 2 (DR + DE)")
    train.add_argument("--batch-size", type=_POSITIVE["batch size"], help="slices per training batch")
    train.add_argument("--lambda-energy", type=_positive_float,
                       help="weight of the mean energy in step 2 (paper: 5e-4)")
    train.add_argument("--components", type=_POSITIVE["components"], help="number of mixture components C (paper: 6)")
    train.add_argument("--lesion-margin", type=_non_negative_int, help="slices kept away from any labelled lesion")
    train.add_argument("--seed", type=_non_negative_int, help="random seed (default 0)")
    train.add_argument("--workers", type=_non_negative_int,
                       help="DataLoader worker processes (default 0: read in the main process)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="any other config value, e.g. --set model.use_dr=false (JSON values)")
    train.add_argument("--resume", action="store_true", help="continue from <output>.ckpt after an interruption")
    _add_device(train)
    _add_progress(train)
    _add_pattern(train)

    cache = commands.add_parser("cache", help="preprocess a large cohort once into a memory-mapped slice cache")
    cache.add_argument("data_dir", type=Path, help="folder of cases or a domains file (.json)")
    cache.add_argument("-o", "--output", type=Path, required=True, help="new cache folder (pass it to train)")
    cache.add_argument("--preset", choices=sorted(PRESETS), default="small",
                       help="preset whose preprocessing the cache uses (default: small)")
    cache.add_argument("--lesion-margin", type=_non_negative_int, help="slices kept away from any labelled lesion")
    _add_pattern(cache)

    predict = commands.add_parser("predict", help="write <case>_energy.nii.gz and <case>_anomaly.nii.gz")
    predict.add_argument("model", help="model file, or 'default' for the bundled model")
    predict.add_argument("input", type=Path, help="a case folder or a folder of cases")
    predict.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    predict.add_argument("--threshold", type=_THRESHOLD,
                         help="energy threshold (default: the model's); cases already predicted by this model "
                              "are re-thresholded from their stored energy, without running the networks")
    predict.add_argument("--batch-size", type=_POSITIVE["batch size"], default=16,
                         help="slices per network batch (default 16)")
    predict.add_argument("--overwrite", action="store_true", help="recompute cases whose outputs exist")
    predict.add_argument("--workers", type=_POSITIVE["workers"], default=1,
                         help="cases predicted in parallel processes (default 1)")
    predict.add_argument("--shard", type=_SHARD, metavar="K/N",
                         help="take only the K-th of N parts of the folder (1-based), so that independent "
                              "cluster jobs split one folder without overlap")
    predict.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="CtoC precision: auto = bf16/fp16 on a GPU, fp32 on CPU (default: auto)")
    predict.add_argument("--compile", action="store_true",
                         help="run the CtoC network through torch.compile (pays off over many cases)")
    _add_postprocess_settings(predict)
    _add_device(predict)
    _add_progress(predict)
    _add_pattern(predict)
    _add_raw_options(predict)

    evaluate = commands.add_parser("evaluate", help="pixel AUROC/AUPRC/Dice inside the brain, with the FLAIR baseline")
    evaluate.add_argument("model", help="model file, or 'default'")
    evaluate.add_argument("data_dir", type=Path, help="folder of labelled cases or a domains file (.json)")
    evaluate.add_argument("--slices", choices=("lesion", "all"), default="lesion",
                          help="score lesion slices only (validation protocol) or whole brains")
    evaluate.add_argument("--threshold", type=_THRESHOLD, help="energy threshold for Dice (default: the model's)")
    evaluate.add_argument("--json", type=Path, default=Path("evaluation.json"), help="JSON report to write")
    evaluate.add_argument("--batch-size", type=_POSITIVE["batch size"], default=16,
                          help="slices per network batch (default 16)")
    _add_postprocess_settings(evaluate)
    _add_device(evaluate)
    _add_pattern(evaluate)

    demo = commands.add_parser("demo", help="run the bundled model on the bundled MS case")
    demo.add_argument("-o", "--output", type=Path, default=Path("admanomaly_demo"), help="output folder")
    _add_device(demo)
    _add_progress(demo)

    study = commands.add_parser("study", help="evaluation study: ADM, ablations, improvements and baselines on "
                                              "patient-level folds; JSON, figures and docs/results.md")
    study.add_argument("data_dir", type=Path, nargs="?",
                       help="folder of labelled cases for patient-level folds (e.g. ../shared/data/brats18)")
    study.add_argument("--domains", type=Path, metavar="FILE.json",
                       help="leave one domain out: a JSON file mapping each domain to its folder, case glob, "
                            "layout and pool (domains also reported pooled; e.g. benchmarks/domains.json); instead "
                            "of the data folder")
    setting = study.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true", help="2-core CPU setting, < 30 min (default)")
    setting.add_argument("--full", action="store_true", help="GPU setting: paper preset, 50 + 50 epochs, 3 seeds")
    study.add_argument("-o", "--output", type=Path, default=Path("runs/study"),
                       help="folder for study.json and examples.npz (default: runs/study)")
    study.add_argument("--docs", type=Path, default=Path("docs"), help="where results.md and figures/ go (default: docs)")
    study.add_argument("--report-only", nargs="*", type=Path, metavar="FOLDER_OR_JSON",
                       help="only regenerate the figures and results.md from FOLDER/study.json or a study JSON "
                            "file (default: OUTPUT); a patient-fold and leave-one-domain-out studies make one report")
    study.add_argument("--no-report", action="store_true", help="write the JSON only")
    study.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    study.add_argument("--folds", type=_POSITIVE["folds"], help="patient-level folds (default: the setting's)")
    study.add_argument("--left-out", help="with --domains: comma-separated domains to leave out in turn (default: "
                                          "every domain)")
    study.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    study.add_argument("--image-size", type=_POSITIVE["image size"], help="network slice size (default: the setting's)")
    study.add_argument("--epochs-ctoc", type=_non_negative_int, help="epochs of step 1 (CtoC)")
    study.add_argument("--epochs-joint", type=_non_negative_int, help="epochs of step 2 (DR + DE)")
    study.add_argument("--preset", choices=sorted(PRESETS), help="size preset (default: the setting's)")
    study.add_argument("--max-cases", type=_POSITIVE["cases"], help="use only the first N cases (smoke tests)")
    study.add_argument("--search-cases", type=_POSITIVE["cases"],
                       help="training cases per domain or fold the post-processing search scores (default: the "
                            "setting's, 4 quick, all full)")
    study.add_argument("--synthetic-cases", type=_non_negative_int,
                       help="with --domains: paint small lesions into this many scans of each domain and add the "
                            "copies of a run's training domains to its post-processing search (default 0: none)")
    _add_device(study)

    threshold = commands.add_parser(
        "threshold", help="re-threshold a results folder from its stored energies (no network run)",
        description="Rewrite every finished case's <case>_anomaly.nii.gz in a predict results folder at a new "
                    "energy threshold, from its stored energy map, and update cases.csv.")
    threshold.add_argument("results", type=Path, help="results folder written by 'admanomaly predict'")
    threshold.add_argument("--threshold", type=_THRESHOLD, required=True, help="new energy threshold")
    _add_progress(threshold)

    calibrate = commands.add_parser(
        "calibrate", help="choose a model's threshold anew on labelled cases, optionally with other post-processing",
        description="Write a copy of MODEL whose threshold is chosen on the lesion slices of the labelled cases in "
                    "DATA (a folder, or a domains file: highest mean Dice over its domains), with the "
                    "post-processing changed by --set; no retraining.")
    calibrate.add_argument("model", help="model file, or 'default'")
    calibrate.add_argument("data_dir", type=Path, help="folder of labelled cases or a domains file (.json)")
    calibrate.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.admm)")
    calibrate.add_argument("--batch-size", type=_POSITIVE["batch size"], default=16,
                           help="slices per network batch (default 16)")
    calibrate.add_argument("--choose-load-weight", action="store_true",
                           help="first choose postprocess.load_weight (the lesion-load term) by how well the "
                                "threshold transfers between the domains of a domains file")
    _add_postprocess_settings(calibrate, needs_threshold=False)
    _add_device(calibrate)
    _add_pattern(calibrate)

    info = commands.add_parser("info", help="print a model file's settings, threshold and validation metrics")
    info.add_argument("model", help="model file, or 'default'")
    return parser


def _add_raw_options(parser: argparse.ArgumentParser) -> None:
    raw = parser.add_argument_group("raw scans (ADMAnomalyLib.rawprep)")
    raw.add_argument("--preprocess", choices=("none", "auto", "full"), default="none",
                     help="none: cases are co-registered and skull-stripped (default); auto: register the series "
                          "to FLAIR and extract the brain when they need it; full: always. Outputs lie on the FLAIR grid; "
                          "a case's mask file (<case>_mask, or --pattern mask=...) replaces brain extraction")
    raw.add_argument("--register", choices=("auto", "yes", "no"), help="force registration on or off")
    raw.add_argument("--skull-strip", choices=("auto", "yes", "no"), help="force brain extraction on or off")
    raw.add_argument("--n4", action="store_true", help="N4 bias-field correction of each series first")
    raw.add_argument("--write-preprocessed", action="store_true",
                     help="also write each case's registered, brain-extracted volumes to OUT/<case>_preprocessed/")


def _raw_options(args: argparse.Namespace):
    """The ``preprocess`` argument of api.predict_folder from the raw-scan flags."""
    if args.preprocess == "none":
        if args.register or args.skull_strip or args.n4 or args.write_preprocessed:
            from .errors import InputError

            raise InputError("--register, --skull-strip, --n4 and --write-preprocessed need --preprocess auto or full")
        return "none"
    from .rawprep import RawOptions

    return RawOptions.from_mode(args.preprocess, register=args.register, skull_strip=args.skull_strip, n4=args.n4)


def _model_argument(value: str) -> Path | None:
    return None if value == "default" else Path(value)


def _json_line(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


class _FolderProgress:
    """Progress of a folder job as a bar on stderr (cases, and the slices of the case at work) or as
    JSON lines on stdout."""

    def __init__(self, mode: str, stage: str) -> None:
        self.mode, self.stage, self.bar = mode, stage, None

    def __enter__(self) -> "_FolderProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def _bar(self, total: int | None = None) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="case", desc=self.stage, file=sys.stderr)
        elif total is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        return self.bar

    def case_done(self, done: int, total: int, case_id: str) -> None:
        if self.mode == "json":
            _json_line({"stage": self.stage, "step": done, "steps": total, "case": case_id})
        elif self.mode == "bar":
            bar = self._bar(total)
            bar.set_postfix_str(case_id)
            bar.update(done - bar.n)

    def within_case(self, case_id: str, done: int, total: int) -> None:
        if self.mode == "json":
            _json_line({"stage": "slices", "case": case_id, "step": done, "steps": total})
        elif self.mode == "bar":
            self._bar().set_postfix_str(f"{case_id}: slice {done}/{total}")


def _version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (a cluster scheduler, ``kill``) cancels like Ctrl-C: exit 130, nothing half-written.
    The previous handler comes back afterwards (``main`` also runs inside other programs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from . import api

    if args.command == "train":
        from .distributed import init_from_environment, shutdown

        config = api.training_config(args.preset, profile=args.profile, epochs_ctoc=args.epochs_ctoc,
                                     epochs_joint=args.epochs_joint,
                                     batch_size=args.batch_size, lambda_energy=args.lambda_energy,
                                     components=args.components, lesion_margin=args.lesion_margin, seed=args.seed,
                                     workers=args.workers, settings=args.set)
        # Under torchrun every rank runs this same command; only rank 0 writes and reports.
        context, device = init_from_environment(args.device)
        try:
            api.train(args.data_dir, args.output, config, device=device, resume=args.resume,
                      progress=_json_line if args.progress == "json" else None,
                      pattern=_parse_pattern(args.pattern), show_progress_bar=args.progress == "bar",
                      metadata={"training_command": "admanomaly " + " ".join(args.argv)}, context=context,
                      ctoc_from=api.load_model(_model_argument(args.ctoc_from)) if args.ctoc_from else None)
        finally:
            shutdown(context)
        if args.progress != "json" and context.is_main:
            print(f"model written to {args.output}")
        return 0

    if args.command == "cache":
        api.build_cache(args.data_dir, args.output, args.preset, args.lesion_margin, pattern=_parse_pattern(args.pattern),
                        progress=lambda done, total, case: print(f"[{done}/{total}] {case}", file=sys.stderr))
        print(f"slice cache written to {args.output}; train with: admanomaly train {args.output} -o MODEL "
              f"--preset {args.preset}")
        return 0

    if args.command == "predict":
        with _FolderProgress(args.progress, "predict") as shown:
            report = api.predict_folder(_model_argument(args.model), args.input, args.output, device=args.device,
                                        threshold=args.threshold, skip_existing=not args.overwrite,
                                        batch_size=args.batch_size, pattern=_parse_pattern(args.pattern),
                                        progress=shown.case_done, workers=args.workers, precision=args.precision,
                                        compile=args.compile, shard=args.shard, case_progress=shown.within_case,
                                        preprocess=_raw_options(args), write_preprocessed=args.write_preprocessed,
                                        postprocess=_postprocess_overrides(args))
        summary = (f"{len(report.done)} written, {len(report.rethresholded)} re-thresholded, "
                   f"{len(report.skipped)} skipped, {len(report.failed)} failed")
        if args.progress == "json":
            _json_line({"stage": "done", **report.__dict__})
        else:
            print(summary)
        # Printed once, after the bar: the log of a batch is this list (also in errors.log).
        for case_id, message in report.failed.items():
            print(f"error: {case_id}: {message}", file=sys.stderr)
        return EXIT_PARTIAL if report.failed else 0

    if args.command == "threshold":
        with _FolderProgress(args.progress, "threshold") as shown:
            table = api.rethreshold_folder(args.results, args.threshold, progress=shown.case_done)
        rewritten = [r for r in table.values() if r.done]
        if args.progress != "json":
            print(f"{len(rewritten)} anomaly maps rewritten at threshold {args.threshold:g} in {args.results}")
        return 0

    if args.command == "calibrate":
        model = api.calibrate(_model_argument(args.model), args.data_dir, args.output,
                              postprocess=_postprocess_overrides(args), device=args.device,
                              batch_size=args.batch_size, pattern=_parse_pattern(args.pattern),
                              choose_load_weight=args.choose_load_weight)
        summary = model.metadata["validation"]
        load = f", load weight {summary['load_weight']:g}" if model.config.postprocess.load_weight else ""
        print(f"threshold {model.threshold:.4g} ({summary['rule']}, {summary['cases']} cases{load}); "
              f"model written to {args.output}")
        return 0

    if args.command == "evaluate":
        report = api.evaluate(_model_argument(args.model), args.data_dir, slices=args.slices, device=args.device,
                              batch_size=args.batch_size, threshold=args.threshold, pattern=_parse_pattern(args.pattern),
                              postprocess=_postprocess_overrides(args), json_path=args.json,
                              progress=lambda done, total, case: print(f"[{done}/{total}] {case}", file=sys.stderr))
        print(format_table(report))
        print(f"report written to {args.json}")
        return 0

    if args.command == "demo":
        with _FolderProgress(args.progress, "demo") as shown:
            summary = api.demo(args.output, device=args.device, progress=shown.within_case)
        print(f"demo case {summary['case']} with {summary['model']}")
        print(f"AUROC {summary['auroc']:.3f}  AUPRC {summary['auprc']:.3f}  best Dice {summary['best_dice']:.3f}  "
              f"Dice@threshold {summary['dice_at_threshold']:.3f}")
        for name, path in summary["outputs"].items():
            print(f"{name}: {path}")
        return 0

    if args.command == "study":
        return _run_study(args)

    if args.command == "info":
        print(json.dumps(api.model_info(_model_argument(args.model)), indent=2))
        return 0
    raise AssertionError(args.command)


def _run_study(args: argparse.Namespace) -> int:
    from . import api

    overrides: dict[str, Any] = {"device": args.device}
    for flag, name in (("folds", "n_folds"), ("image_size", "image_size"), ("epochs_ctoc", "epochs_ctoc"),
                       ("epochs_joint", "epochs_joint"), ("preset", "preset"), ("max_cases", "max_cases"),
                       ("search_cases", "search_cases_per_group"), ("synthetic_cases", "synthetic_cases_per_domain")):
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if args.seeds:
        try:
            overrides["seeds"] = tuple(int(v) for v in args.seeds.split(","))
        except ValueError:
            raise InputError(f"--seeds expects comma-separated whole numbers, not {args.seeds!r}") from None
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(","))
    if args.left_out:
        overrides["left_out"] = tuple(d.strip() for d in args.left_out.split(","))
    report_only = args.report_only is not None
    if not report_only and (args.data_dir is None) == (args.domains is None):
        raise argparse.ArgumentTypeError("study: give either a folder of labelled cases or --domains FILE.json "
                                         "(exactly one)")
    outcome = api.study(args.data_dir, args.output, "full" if args.full else "quick",
                        docs_dir=None if args.no_report else args.docs, run=not report_only,
                        domains=args.domains, report_dirs=args.report_only or None,
                        progress=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
                                                       flush=True),
                        command="admanomaly " + " ".join(args.argv), **({} if report_only else overrides))
    if outcome["result"] is not None:
        from .study import format_table as study_table

        print(study_table(outcome["result"], markdown=False))
        print(f"study written to {args.output / 'study.json'} in {outcome['result']['runtime_s'] / 60:.1f} min")
    if outcome["report"] is not None:
        print(f"report written to {outcome['report']}")
    return 0


def _postprocess_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--set postprocess.FIELD=VALUE`` of predict, evaluate and calibrate, and ``--set preprocess.FIELD=VALUE``
    for the fields a trained model may take (:data:`~ADMAnomalyLib.config.INFERENCE_PREPROCESS_FIELDS`; other
    settings need retraining)."""
    from .api import parse_settings
    from .config import INFERENCE_PREPROCESS_FIELDS

    sections = parse_settings(args.set)
    native = sections.pop("preprocess", {})
    other = sorted(set(sections) - {"postprocess"}) + sorted(f"preprocess.{k}" for k in native
                                                              if k not in INFERENCE_PREPROCESS_FIELDS)
    if other:
        raise InputError(f"--set here takes postprocess.FIELD=VALUE and "
                         f"{', '.join(f'preprocess.{k}' for k in INFERENCE_PREPROCESS_FIELDS)} only, not {', '.join(other)}: "
                         "those shape the trained networks")
    overrides = {**sections.get("postprocess", {}), **native}
    return overrides or None


def format_table(report: dict[str, Any]) -> str:
    """Plain-text table of the pooled metrics of an evaluation report."""
    header = f"{'method':<16}{'AUROC':>8}{'AUPRC':>8}{'bestDice':>10}{'Dice@thr':>10}{'prec':>8}{'recall':>8}"
    lines = [f"pixel metrics inside the brain, {report['slices']} slices, {len(report['cases'])} cases", header]
    for method, result in report["methods"].items():
        pooled = result["pooled"]
        at = result.get("at_threshold") or {}
        cells = [(pooled.get("auroc"), 8), (pooled.get("auprc"), 8), (pooled.get("best_f1"), 10),
                 (at.get("dice"), 10), (at.get("precision"), 8), (at.get("recall"), 8)]
        lines.append(f"{method:<16}" + "".join(_cell(value, width) for value, width in cells))
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    # Undefined metrics (no positive voxel, 0/0) arrive as None from the JSON-safe report.
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``admanomaly`` command; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with _interrupt_on_sigterm():
            return _run(args)
    except ADMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`admanomaly info m.admm | head`): not an error of ours.
        # Point stdout at devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
