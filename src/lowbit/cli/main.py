"""`lowbit`: quantize models for phones and edge devices. User mistakes print one line and exit 2.

Each command lives in its own module with `add_parser(subparsers)`, which sets `run` as the default.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings

from .._version import __version__
from ..errors import LowbitError
from ..recipe import PRESETS, preset
from . import auto_cmd, bench_cmd, diagnose_cmd, eval_cmd, export_cmd, quantize_cmd, report_cmd

EPILOG = """examples:
  lowbit quantize model.onnx -o model.int8.onnx --calib images/
  lowbit quantize model.onnx -o model.int8.onnx --calib samples.npz --calibration percentile
  lowbit quantize model.onnx -o model.int8.onnx --recipe my_recipe.json --calib images/
  lowbit quantize retrained.onnx -o retrained.int8.onnx --plan model.int8.plan.json
  lowbit auto model.onnx -o model.auto.onnx --calib images/ --eval more_images/ --max-drop 1
  lowbit recipe --show default > my_recipe.json
"""

COMMANDS = [quantize_cmd, auto_cmd, eval_cmd, bench_cmd, diagnose_cmd, report_cmd, export_cmd]


def _show_recipe(args: argparse.Namespace) -> int:
    print(preset(args.show).to_json())
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize trained neural networks (ONNX) to int8 for phones and edge devices.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    r = sub.add_parser("recipe", help="print a built-in recipe to start from")
    r.add_argument("--show", metavar="PRESET", default="default", help=f"one of: {', '.join(PRESETS)}")
    r.set_defaults(run=_show_recipe)
    return p


def _warn_once() -> None:
    """Warnings (third-party ones included) as `lowbit: warning: ...`, each message once, with no source line."""
    seen: set[str] = set()

    def show(message: Warning | str, *_: object, **__: object) -> None:
        lines = str(message).strip().splitlines()
        text = lines[0] if lines else type(message).__name__
        if text not in seen:
            seen.add(text)
            print(f"lowbit: warning: {text}", file=sys.stderr)

    warnings.showwarning = show


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a CI timeout) ends lowbit as Ctrl-C does: temporaries removed


def main(argv: list[str] | None = None) -> int:
    shown = warnings.showwarning
    _warn_once()
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown  # main() may run in-process (tests, notebooks)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from ..graph.write import written_paths

    before = len(written_paths())
    # Signal handlers can only be installed from the main thread (main() called from a thread keeps the default).
    term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if term is not None:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Writes are all-or-nothing (graph.write.write_together), so this says exactly what is on disk.
        done = written_paths()[before:]
        if done:
            print(f"lowbit: interrupted after writing {', '.join(map(str, done))}", file=sys.stderr)
        else:
            print("lowbit: interrupted; no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit ... | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")
        return 141
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)


if __name__ == "__main__":
    sys.exit(main())
