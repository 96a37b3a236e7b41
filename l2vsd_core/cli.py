"""``python -m l2vsd_core generate``: the flags (built from :data:`l2vsd_core.config.OPTIONS`, so each flag's default
is its config field's), a tqdm bar per stage and Ctrl-C handling (the first one stops after the current step with
the checkpoint written, a second one aborts), and :func:`~l2vsd_core.generate.generate`.

The prior's recipe (:mod:`l2vsd_core.recipes`) fills what the command line does not set: ``--prior toy`` runs the
toy-sized settings, an SD checkpoint ProlificDreamer's; the defaults shown by ``--help`` are ProlificDreamer's.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from typing import Callable, Optional

from .config import OPTIONS, option_defaults

__all__ = ["add_generate_arguments", "auto_or_number", "options_from_args", "given_options", "run_cli", "ProgressBar",
           "CtrlC"]


# --------------------------------------------------------------------------------------------------------- parsing
def _ints(text: str) -> tuple:
    text = text.strip()
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 64,512; got {text!r}") from None


def _floats(n: Optional[int] = None):
    def parse(text: str) -> tuple:
        try:
            vals = tuple(float(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None
        if n is not None and len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers; got {text!r}")
        if not all(math.isfinite(v) for v in vals):
            raise argparse.ArgumentTypeError(f"expected finite numbers; got {text!r}")
        return vals
    parse.__name__ = "numbers"
    return parse


def _schedule(text: str):
    """A number, or threestudio's schedule ``start_step,v0,v1,end_step``."""
    vals = _floats()(text)
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 4:
        whole = lambda v: int(v) if v.is_integer() else v  # noqa: E731
        return [whole(vals[0]), vals[1], vals[2], whole(vals[3])]
    raise argparse.ArgumentTypeError(f"expected a number or start_step,v0,v1,end_step; got {text!r}")


def auto_or_number(what: str, at_least: Optional[float] = None):
    """A flag's type: ``auto`` or a finite number (``>= at_least``), ``what`` naming it in the error."""
    def parse(text: str):
        if text == "auto":
            return "auto"
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {what}; got {text!r}") from None
        if not math.isfinite(v) or (at_least is not None and v < at_least):
            bound = "" if at_least is None else f" >= {at_least:g}"
            raise argparse.ArgumentTypeError(f"expected 'auto' or {what}, finite{bound}; got {text!r}")
        return v
    parse.__name__ = "auto_or_number"
    return parse


_threshold = auto_or_number("a density value")


_TYPES = {"int": int, "float": float, "str": str, "ints": _ints, "floats2": _floats(2), "floats3": _floats(3),
          "schedule": _schedule, "threshold": _threshold}
_RUN = (("--prompt", dict(required=True, help="the text to generate")),
        ("--negative-prompt", dict(default="", help="negative prompt for classifier-free guidance")),
        ("--prior", dict(required=True, help="'toy' (the bundled prior, with its toy-sized recipe), a diffusers "
                                             "folder or a single-file SD 1.x/2.x .safetensors")),
        ("--out", dict(required=True, help="output folder (created)")),
        ("--resume", dict(action="store_true", help="continue from OUT's checkpoints up to the step counts")),
        ("--no-progress", dict(action="store_true", help="no progress bar")))


def add_generate_arguments(parser: argparse.ArgumentParser, defaults: bool = True,
                           run_flags: bool = True) -> argparse.ArgumentParser:
    """The ``generate`` flags; ``defaults=False``: none (the namespace then holds only what was given);
    ``run_flags=False``: only the settings (``batch`` has its own --prompts, --out, --prior)."""
    shown = option_defaults()
    run = parser.add_argument_group("run")
    for flag, kw in _RUN if run_flags else ():
        if not defaults and "required" not in kw:
            kw = {**kw, "default": argparse.SUPPRESS}
        run.add_argument(flag, **kw)
    group = parser.add_argument_group("settings (defaults: ProlificDreamer; the prior's recipe may change them)")
    for option in OPTIONS:
        flag = "--" + option.dest.replace("_", "-")
        default = shown[option.dest] if defaults else argparse.SUPPRESS
        if isinstance(default, list):
            default = tuple(default) if option.kind != "schedule" else default
        if option.kind == "flag":
            group.add_argument(flag, action="store_true", default=default, help=option.help)
            continue
        kind = _TYPES[option.kind]
        choices = option.choices
        if choices is not None and option.kind == "int":
            choices = tuple(int(c) for c in choices)
        group.add_argument(flag, type=kind, default=default, choices=choices, help=option.help or None,
                           metavar=None if choices else option.kind.upper())
    return parser


def options_from_args(args: argparse.Namespace) -> dict:
    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    opts.pop("command", None)
    return opts


def given_options(argv: list) -> dict:
    """Only the options ``argv`` sets (the prior's recipe fills the rest)."""
    parser = add_generate_arguments(argparse.ArgumentParser(add_help=False), defaults=False)
    return options_from_args(parser.parse_args(argv))


# ------------------------------------------------------------------------------------------------------ progress
class ProgressBar:
    """tqdm when importable, else a plain ``\\r`` line on stderr."""

    def __init__(self, total: int, initial: int, desc: Optional[str] = None):
        self.total, self.initial, self.last, self.desc = total, initial, initial, desc
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc=desc)
        except ImportError:
            self.bar = None
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, terms: dict) -> None:
        loss = terms.get("loss", float("nan"))
        if self.bar is not None:
            self.bar.update(done - self.last)
            self.bar.set_postfix(loss=f"{loss:.4g}", res=int(terms.get("resolution", 0)), refresh=False)
        else:
            rate = (time.perf_counter() - self.t0) / max(done - self.initial, 1)
            print(f"\r{self.desc + ': ' if self.desc else ''}step {done}/{total}  loss {loss:.4g}  {rate:.2f} s/step",
                  end="", file=sys.stderr, flush=True)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


class StageBars:
    """One :class:`ProgressBar` per stage (``terms["stage"]``), and a ``log`` that finishes the bar's line first."""

    NAMES = {1: "stage 1 (NeRF)", 2: "stage 2 (geometry)", 3: "stage 3 (texture)"}

    def __init__(self, enabled: bool = True, label=None):
        self.enabled, self.bar, self.stage = enabled, None, None
        self.label = label or (lambda stage: None if stage is None else self.NAMES[int(stage)])

    def __call__(self, done: int, total: int, terms: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None and terms.get("stage") != self.stage:
            self.close()
        if self.bar is None:
            self.stage = terms.get("stage")
            self.bar = ProgressBar(total, done - 1, self.label(self.stage))
        self.bar(done, total, terms)

    def log(self, message: str) -> None:
        self.close()
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CtrlC:
    """In the main thread: the first of ``signals`` (default SIGINT) asks to stop after the current step — the flag
    ``requested``, then ``on_request()`` (default: say so on stderr) — and a second SIGINT raises KeyboardInterrupt."""

    def __init__(self, on_request: Optional[Callable[[], None]] = None, signals: tuple = (signal.SIGINT,)):
        self.requested, self._old, self.signals = False, {}, signals
        self.on_request = on_request or (lambda: print(
            "\ninterrupt: stopping after this step and writing the checkpoint (Ctrl-C again to abort)",
            file=sys.stderr, flush=True))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        self.on_request()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_cli(argv: list, parser: argparse.ArgumentParser) -> int:
    """``generate`` for ``argv`` (already checked by ``parser``); user errors → ``parser.error`` (exit 2, one
    line)."""
    from .generate import generate

    options = given_options(argv)
    bars = StageBars(enabled=not options.pop("no_progress", False))
    try:
        result = generate(options, progress=bars, log=bars.log, interrupts=CtrlC)
    except KeyboardInterrupt:
        bars.close()
        print(f"interrupted; checkpoints in {options['out']} (continue with --resume)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        bars.close()
        parser.error(" ".join(str(e).split()))
    bars.close()
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 130 if result["stopped"] else 0
