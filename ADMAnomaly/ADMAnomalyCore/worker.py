"""Background inference process of the module panel (``python -m ADMAnomalyCore.worker``).

Reads the four contrasts the panel wrote, calls ``ADMAnomalyLib.api.predict`` and writes
``energy.mha`` and ``brain.mha`` into ``--output-dir``. Progress goes to stdout as JSON lines
``{"stage": "predict", "step": i, "steps": n}`` (slices), then ``{"stage": "done", ...}``; a
failure is one ``error: ...`` line on stderr and the engine's exit code. Needs no Slicer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ADMAnomalyCore.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="model file, or 'default' for the bundled model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input", action="append", default=[], metavar="CONTRAST=PATH", required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--preprocess", choices=("none", "auto", "full"), default="none",
                        help="raw scans: register to FLAIR and extract the brain (ADMAnomalyLib.rawprep)")
    args = parser.parse_args(argv)

    here = Path(__file__).resolve().parent.parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    from ADMAnomalyCore.engine import ensure_engine_importable

    ensure_engine_importable()
    from ADMAnomalyLib import api, errors
    from ADMAnomalyLib.io import write_image_atomic
    from ADMAnomalyLib.io import read_image

    try:
        images = {}
        for item in args.input:
            contrast, sep, path = item.partition("=")
            if not sep:
                raise errors.InputError(f"--input expects CONTRAST=PATH, got {item!r}")
            images[contrast.strip()] = read_image(path)
        model = api.load_model(None if args.model == "default" else args.model)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        if args.preprocess != "none":
            _emit({"stage": "preprocess"})
        prediction = api.predict(model, images, device=args.device, batch_size=args.batch_size,
                                 progress=lambda done, total: _emit({"stage": "predict", "step": done, "steps": total}),
                                 preprocess=args.preprocess)
        # Uncompressed: the Slicer process reads these back at once and deletes them.
        write_image_atomic(prediction.energy, args.output_dir / "energy.mha", compress=False)
        write_image_atomic(prediction.brain_mask, args.output_dir / "brain.mha", compress=False)
        _emit({"stage": "done", "threshold": prediction.threshold, "slices": prediction.n_slices_processed,
               "model": str(model.path) if model.path else None})
        return 0
    except errors.ADMError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:
        print(f"error: cannot write the result to {args.output_dir}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return errors.OutputError.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return errors.CancelledError.exit_code


if __name__ == "__main__":
    sys.exit(main())
