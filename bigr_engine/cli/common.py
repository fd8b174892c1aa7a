"""What the `bigr` commands share: the error format, devices, model loading, output checks, and the model and
sampling flags of `generate` and `sample-many`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from bigr_engine.errors import BigrError
from bigr_engine.sampling.reuse import PRESETS as REUSE_PRESETS

NO_MODEL = ("no model given: pass --ckpt bigr_L_d24.pt (a released BiGR .pt or a .safetensors from `bigr convert`) "
            "and --bae binaryae_ema_1000000.th (the B-AE tokenizer it was trained with)")


def pick_device(name: str | None) -> torch.device:
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise BigrError(f"unknown device {name!r}; pass cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BigrError(f"--device {name} was asked for but no CUDA GPU is visible; pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BigrError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible; pass cuda:0")
    elif dev.type != "cpu":
        raise BigrError(f"unsupported device {name!r}; pass cpu or cuda")
    return dev


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = ("the engine's matmul precision under autocast (weights and probabilities stay float32): auto = bfloat16 "
              "on CUDA, float32 on CPU")


def load_models(args, device):
    """(model, bae) from --ckpt/--bae, or from `bigr_engine.load_default()` when neither is given."""
    import bigr_engine as be
    from bigr_engine.errors import CheckpointError
    if args.ckpt is None and args.bae is None:
        loader = getattr(be, "load_default", None)
        if loader is None:
            raise BigrError(NO_MODEL)
        try:
            return loader(device=device)
        except CheckpointError:
            raise  # a default is installed but broken: say which file
        except BigrError:
            raise BigrError(NO_MODEL) from None
    if args.ckpt is None or args.bae is None:
        missing = "--ckpt (the BiGR model)" if args.ckpt is None else "--bae (the B-AE tokenizer the model was trained with)"
        raise BigrError(f"pass {missing} too: --ckpt and --bae go together (or give neither to use the bundled default)")
    model = be.load_bigr(args.ckpt, device=device)
    bae = be.load_bae(args.bae, device=device)
    return model, bae


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Fail early (before any work) when `out` cannot become a folder we can write into."""
    if out.exists() and not out.is_dir():
        raise BigrError(f"{flag} {out} is an existing file; pass a folder (it is created if missing)")
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        raise BigrError(f"{flag} {out}: {p} is a file, not a folder; pass a folder path")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise BigrError(f"{flag} {out}: {p} is not writable; pass a folder you can write to")


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line "error: ..." on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} -h`\n")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_model_and_sampling_flags(p, classes_help: str) -> None:
    """The model, class and sampling flags `generate` and `sample-many` share (defaults None: the model's own)."""
    p.add_argument("--ckpt", metavar="MODEL", help="BiGR model (released .pt or .safetensors); default: the bundled model")
    p.add_argument("--bae", metavar="TOKENIZER", help="B-AE tokenizer (released .th or .safetensors); default: the bundled one")
    p.add_argument("--classes", help="class ids or names, comma-separated, " + classes_help)
    p.add_argument("--seed", type=int, default=0, help="random seed; image i depends only on (seed, i)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 2.5, or the bundled model's)")
    p.add_argument("--iters", type=int, help="unmasking iterations (default 20, or the bundled model's)")
    p.add_argument("--steps", type=int, help="transcoder denoising steps (default 100, or the bundled model's)")
    p.add_argument("--gumbel", type=float, help="Gumbel temperature of the unmasking order (default 0, or the bundled model's)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], help="guidance over the iterations (default constant)")
    p.add_argument("--gumbel-schedule", choices=["constant", "down", "up"], help="Gumbel temperature over the iterations "
                   "(default constant)")
    p.add_argument("--temperature", type=float, help="transcoder logit temperature (default 1)")
    p.add_argument("--greedy", action="store_true", help="every draw replaced by its mode (fully deterministic)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--reuse", default="exact", choices=list(REUSE_PRESETS),
                   help="state reuse across iterations: exact (default; the same images as off), off, or fast "
                        "(approximate: faster, changes the images; its measured quality cost is in the README)")


def sampling_from_args(args, model) -> dict:
    """model.generate keywords from add_model_and_sampling_flags' flags: the flags given, the model's own defaults
    (the bundled model carries tuned ones) for the rest. Checked here, before any work or progress bar starts."""
    given = {k: getattr(args, k) for k in ("cfg", "iters", "steps", "gumbel", "cfg_schedule", "gumbel_schedule",
                                           "temperature")}
    if args.greedy:
        given["greedy"] = True
    model.sampling_options(**given, seed=args.seed)
    return {**{k: v for k, v in given.items() if v is not None}, "dtype": args.dtype, "reuse": args.reuse}


def add_model_flags(p) -> None:
    """--ckpt, --bae and --device of the commands that run a model (the applications, serve)."""
    p.add_argument("--ckpt", metavar="MODEL", help="BiGR checkpoint (.pt release file or .safetensors); default: the "
                                                   "bundled model (with --bae)")
    p.add_argument("--bae", metavar="TOKENIZER", help="B-AE tokenizer checkpoint (.th release file or .safetensors); "
                                                      "default: the bundled one")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


RUN_MANIFEST = "bigr_run.json"


def with_run_manifest(out: Path, files: dict, args) -> dict:
    """files + out/bigr_run.json, written last: the files of this run (relative to out) and the command that made
    them. A reused --out keeps earlier runs' files (nothing is deleted); the manifest says which files are this run's."""
    import json

    from bigr_engine import __version__
    names = sorted(str(Path(p).relative_to(out)) for p in files)
    record = {"command": "bigr " + " ".join(getattr(args, "argv", []) or []), "bigr_engine": __version__,
              "files": names}
    return {**files, out / RUN_MANIFEST: json.dumps(record, indent=1) + "\n"}


def report_earlier_files(out: Path, files: dict) -> None:
    """One line when `out` also holds files this run did not write (from an earlier run into the same folder)."""
    ours = {Path(p).resolve() for p in files}
    others = [p for p in out.rglob("*") if p.is_file() and p.resolve() not in ours and p.name != RUN_MANIFEST]
    if others:
        print(f"note: {out}/ also holds {len(others)} file{'s' if len(others) != 1 else ''} from earlier runs; "
              f"{out / RUN_MANIFEST} lists this run's")


def one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__
