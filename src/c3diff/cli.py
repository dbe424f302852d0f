"""The ``c3diff`` command: ``demo``, ``predict``, ``train`` and ``fit``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

_DESCRIPTION = """\
c3diff super-resolves spatial transcriptomics with the paired H&E (C3-Diff).

  c3diff demo                      simulate a section and run the whole flow with the bundled demo model
  c3diff predict SECTION.zarr ...  super-resolve a SpatialData zarr and write the new layers into it
  c3diff train CONFIG.yaml         train a model from a config file
  c3diff fit SECTION.zarr ...      fit a model on a real slide, supervised by its own spots (no 10 um truth)

Run `c3diff COMMAND --help` for the options of each command. Errors are reported as one line; add --verbose for
the full traceback and warnings with their source.
"""

#: Exceptions that mean the input or the options are wrong: reported as their message alone.
_USER_ERRORS = (KeyError, ValueError, TypeError, OSError, NotImplementedError)


class UsageError(Exception):
    """A problem with the command line or a config file, reported as one line."""


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c3diff", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from c3diff import __version__

    parser.add_argument("--version", action="version", version=f"c3diff {__version__}")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show tracebacks of errors and warnings with their source lines"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    verbose = argparse.ArgumentParser(add_help=False)  # `c3diff COMMAND ... --verbose` works too
    verbose.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks of errors and warnings with their source lines",
    )

    demo = sub.add_parser(
        "demo",
        parents=[verbose],
        help="simulate a section and run the whole flow with the bundled demo model",
        description="Simulate a breast-tissue section, super-resolve it at 10x and 5x with the demo model shipped "
        "inside c3diff and with bicubic upsampling, map immune cell types, score everything against the simulated "
        "truth, and write the SpatialData zarr, a metrics table (markdown + JSON) and PNG figures. Needs no "
        "network and no GPU.",
    )
    demo.add_argument("--output", "-o", default="c3diff_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=1000, help="seed of the simulated section (default: %(default)s)")
    demo.add_argument(
        "--size",
        type=float,
        default=1920.0,
        help="edge of the simulated square section in micrometres (default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=5,
        help="DDIM steps of the residual samples behind the 10x uncertainty layer (default: %(default)s)",
    )
    demo.add_argument(
        "--samples",
        type=_non_negative_int,
        default=2,
        help="mean + residual samples drawn at 10x for the uncertainty layer; 0 = the conditional "
        "mean alone (a model without a mean stage averages this many samples; default: "
        "%(default)s)",
    )
    demo.add_argument(
        "--model", default=None, help="a model folder or Hub repo id to use instead of the bundled demo model"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    predict = sub.add_parser(
        "predict",
        parents=[verbose],
        help="super-resolve a SpatialData zarr and write the new layers into it",
        description="Read a SpatialData zarr store, super-resolve its low-resolution counts with the H&E "
        "(c3.tl.super_resolve), optionally map immune cell types (c3.tl.celltype_map), and write the new elements "
        "into the store (or into a copy with --output).",
    )
    predict.add_argument("input", help="path of the SpatialData zarr store")
    predict.add_argument(
        "--model",
        "-m",
        default=None,
        help="model folder or Hugging Face Hub repo id (required unless --method bicubic)",
    )
    predict.add_argument("--revision", default=None, help="Hub revision (tag, branch or commit) of --model")
    predict.add_argument("--image-key", default="hne", help="H&E image element (default: %(default)s)")
    predict.add_argument("--table-key", default=None, help="spot table to super-resolve (Visium / legacy ST)")
    predict.add_argument("--points-key", default=None, help="transcripts to super-resolve (binned at 100 um)")
    predict.add_argument("--scale", type=int, choices=(5, 10), default=10, help="5x or 10x (default: %(default)s)")
    predict.add_argument(
        "--method",
        choices=("c3diff", "bicubic"),
        default="c3diff",
        help="the model or the bicubic baseline (default: %(default)s)",
    )
    predict.add_argument("--genes", nargs="+", default=None, help="genes to predict (default: all of the model's)")
    predict.add_argument("--steps", type=_positive_int, default=50, help="DDIM steps (default: %(default)s)")
    predict.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    predict.add_argument(
        "--samples",
        type=_positive_int,
        default=1,
        help="samples per tile; >1 adds a _std uncertainty layer (default: %(default)s)",
    )
    predict.add_argument(
        "--calibration",
        choices=("lr_pixel", "tile"),
        default=None,
        help="how predictions become counts: lr_pixel (each 100 um LR pixel sums to its count; "
        "default for c3diff) or tile (one factor per tile and gene; default for bicubic)",
    )
    predict.add_argument(
        "--batch-size", type=_positive_int, default=4, help="tiles per model call (default: %(default)s)"
    )
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    predict.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    predict.add_argument("--key-added", default=None, help="name of the new layer (default: IMAGE_KEY_METHOD_xSCALE)")
    predict.add_argument(
        "--overwrite",
        action="store_true",
        help="replace layers of the same names made before (the input image is never replaced)",
    )
    predict.add_argument(
        "--drop-missing-genes", action="store_true", help="skip model genes absent from the data instead of failing"
    )
    predict.add_argument("--celltypes", action="store_true", help="also run celltype_map on the new layer")
    predict.add_argument(
        "--output",
        "-o",
        default=None,
        help="write a copy of the SpatialData with the new layers here instead of into INPUT",
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bars")

    train = sub.add_parser(
        "train",
        parents=[verbose],
        help="train a model from a YAML/JSON config file",
        description="Train a C3-Diff model with c3.tl.train. The config file (YAML or JSON) holds `output_dir`, "
        "`data` (a list of entries: {zarr: PATH} for a SpatialData store, {patches: FILE.npz} for a saved PatchSet, "
        "{simulate: {seed: 1, width: 2560, ...}} for a simulated section), optional `val_data` in the same form, "
        "and any keyword of c3.tl.train (model, genes, scale, epochs, batch_size, learning_rate, points_key, "
        "table_key, loss_weights, lr_missing_fraction, max_time, ...). Paths in the file are relative to the file. "
        "Command-line options override the file.",
    )
    train.add_argument("config", help="path of the YAML/JSON config file")
    train.add_argument("--output-dir", default=None, help="override `output_dir`")
    train.add_argument("--epochs", type=_positive_int, default=None, help="override `epochs`")
    train.add_argument("--max-time", type=float, default=None, help="stop after this many seconds")
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to continue")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    fit = sub.add_parser(
        "fit",
        parents=[verbose],
        help="fit a model on a real slide, supervised by its own spots (no 10 um truth)",
        description="Fit a model's conditional-mean stage on one slide with c3.tl.fit_slide: neighbouring spots are "
        "pooled into pseudo-spots, and the model learns from the H&E where inside each 100 um pixel the counts go, "
        "so that its expected map summed over each original spot's disc matches the spot's counts. Writes the model "
        "folder (with a model card saying which slide it was fitted on) for `c3diff predict --model`.",
    )
    fit.add_argument("input", help="path of the SpatialData zarr store (H&E and a Visium / legacy-ST spot table)")
    fit.add_argument("--table-key", required=True, help="spot table to fit on")
    fit.add_argument("--out", required=True, help="model folder to write")
    fit.add_argument("--image-key", default="hne", help="H&E image element (default: %(default)s)")
    fit.add_argument(
        "--genes", nargs="+", default=None, help="genes to fit (default: the table's 48 most variable genes)"
    )
    fit.add_argument(
        "--pool", type=_positive_int, default=2, help="spots per side of a pooled block (default: %(default)s)"
    )
    fit.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    fit.add_argument(
        "--steps",
        type=_positive_int,
        default=400,
        help="optimisation steps, unless --minutes runs out first (default: %(default)s)",
    )
    fit.add_argument(
        "--model",
        "-m",
        default="tiny",
        help="start from this preset, model folder or Hub repo id (default: %(default)s)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _load_config(path: Path) -> dict:
    import json

    import yaml

    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"config file {str(path)!r} {state}; pass a YAML or JSON file of options.")
    text = path.read_text()
    try:
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}."
        ) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UsageError(
            f"{str(path)!r} is not valid YAML: {problem}{where}. Fix the file (indentation, `key: value` "
            "pairs, quotes)."
        ) from err
    if not isinstance(config, dict):
        raise UsageError(f"{str(path)!r} must hold a mapping of options, got {type(config).__name__}.")
    return config


def _read_store(path: Path, *, what: str):
    """A SpatialData zarr store, or a one-line error naming ``path``."""
    import spatialdata as sd

    if not path.exists():
        raise UsageError(f"{what}: {str(path)!r} does not exist (expected a SpatialData zarr store).")
    try:
        return sd.read_zarr(path)
    except Exception as err:  # zarr / ome-zarr raise many kinds on a folder that is not a store
        raise UsageError(
            f"{what}: {str(path)!r} is not a readable SpatialData zarr store ({type(err).__name__}: {err})."
        ) from err


def _load_data_entries(entries, *, field: str, base: Path) -> list:
    from c3diff.datasets import simulate_section
    from c3diff.pp import PatchSet

    if entries is None:
        return []
    if not isinstance(entries, list):
        raise UsageError(f"`{field}` must be a list of entries like {{zarr: PATH}}.")
    loaded = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UsageError(
                f"`{field}[{i}]` must be one of {{zarr: PATH}}, {{patches: FILE}}, "
                f"{{simulate: {{...}}}}; got {entry!r}."
            )
        kind, value = next(iter(entry.items()))
        if kind == "zarr":
            loaded.append(_read_store(base / value, what=f"`{field}[{i}]`"))
        elif kind == "patches":
            loaded.append(PatchSet.load(base / value))
        elif kind == "simulate":
            loaded.append(simulate_section(**(value or {})))
        else:
            raise UsageError(f"`{field}[{i}]` has unknown kind {kind!r} (zarr, patches, simulate).")
    return loaded


def _run_train(args: argparse.Namespace) -> int:
    from c3diff.tl import train

    path = Path(args.config)
    config = _load_config(path)
    base = path.parent
    data = _load_data_entries(config.pop("data", None), field="data", base=base)
    val_data = _load_data_entries(config.pop("val_data", None), field="val_data", base=base) or None
    for option, key in (
        ("output_dir", "output_dir"),
        ("epochs", "epochs"),
        ("max_time", "max_time"),
        ("resume", "resume"),
    ):
        if getattr(args, option) is not None:
            config[key] = getattr(args, option)
    if "output_dir" not in config:
        raise UsageError("the config needs `output_dir` (or pass --output-dir).")
    if args.output_dir is None:  # paths in the file are relative to the file
        config["output_dir"] = base / config["output_dir"]
    config["progress"] = not args.quiet
    result = train(data, val_data=val_data, **config)
    print(f"Trained {len(result.history)} epoch(s); model in {result.best_checkpoint or result.output_dir}")
    if len(result.history):
        print(result.history.tail().to_string(index=False))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    import c3diff as c3

    source = Path(args.input)
    if source.is_dir():
        _recover_store(source)
    sdata = _read_store(source, what="INPUT")
    key = args.key_added or f"{args.image_key}_{args.method}_x{args.scale}"
    if key in sdata.images and key != args.image_key and not args.overwrite:
        raise UsageError(
            f"{str(source)!r} already has the layer {key!r}; nothing was changed. Pass --overwrite to "
            "replace it, or --key-added NAME for a new layer."
        )
    kinds = ("images", "labels", "tables")
    before = {(kind, name): id(element) for kind in kinds for name, element in getattr(sdata, kind).items()}
    c3.tl.super_resolve(
        sdata,
        args.image_key,
        table_key=args.table_key,
        points_key=args.points_key,
        genes=args.genes,
        scale=args.scale,
        model=args.model,
        method=args.method,
        steps=args.steps,
        eta=args.eta,
        n_samples=args.samples,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        drop_missing_genes=args.drop_missing_genes,
        revision=args.revision,
        key_added=args.key_added,
        calibration=args.calibration,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    if args.celltypes:
        c3.tl.celltype_map(sdata, key, overwrite=args.overwrite)
    after = {(kind, name): id(element) for kind in kinds for name, element in getattr(sdata, kind).items()}
    new = sorted(k for k in after if k not in before)
    replaced = sorted(k for k, ident in after.items() if before.get(k, ident) != ident)
    removed = sorted(k for k in before if k not in after)  # e.g. a replaced layer's _std
    names = {what: [name for _, name in keys] for what, keys in (("new", new), ("replaced", replaced))}
    if args.output:
        sdata.write(args.output, overwrite=False)
        print(
            f"Wrote {args.output} with the new elements {names['new']}"
            + (f", replaced {names['replaced']}" if replaced else "")
        )
    else:
        _write_in_place(sdata, source, new=new, replaced=replaced, removed=removed)
        print(
            f"Added {names['new']} to {source}"
            + (f"; replaced {names['replaced']}" if replaced else "")
            + (f"; removed {[name for _, name in removed]}" if removed else "")
        )
    return 0


#: The files of a zarr store's root group that hold its attributes and consolidated metadata (zarr v3, then v2).
_ROOT_METADATA = ("zarr.json", ".zattrs", ".zgroup", ".zmetadata")


def _write_in_place(
    sdata, source: Path, *, new: list[tuple[str, str]], replaced: list[tuple[str, str]], removed: list[tuple[str, str]]
) -> None:
    """Write a call's ``(kind, name)`` elements into the store ``sdata`` was read from, all of them or none.

    The elements replaced or removed are first moved aside - into ``.NAME.c3diff-undo-PID`` beside the store, with a
    copy of the store's root metadata and a journal of what was moved and written - and spatialdata then writes the
    new ones; if anything fails, :func:`_roll_back` removes what was written and puts the old elements and metadata
    back (after a kill, the next ``c3diff predict`` on the store does, see :func:`_recover_store`).
    """
    import json
    import shutil

    from c3diff._atomic import staging

    undo = staging(source, "undo")
    undo.mkdir()
    journal: dict[str, list] = {"moved": [], "written": []}

    def save() -> None:
        (undo / "journal.json").write_text(json.dumps(journal))

    for name in _ROOT_METADATA:
        if (source / name).exists():
            shutil.copy2(source / name, undo / name)
    save()
    try:
        for kind, name in [*replaced, *removed]:
            (undo / kind).mkdir(exist_ok=True)
            (source / kind / name).rename(undo / kind / name)
            journal["moved"].append([kind, name])
            save()
        if journal["moved"] and sdata.has_consolidated_metadata():
            sdata.write_consolidated_metadata()  # (what spatialdata's delete_element_from_disk does after deleting)
        for kind, name in [*new, *replaced]:
            journal["written"].append([kind, name])
            save()
            sdata.write_element(name)
        sdata.write_attrs()
    except BaseException:
        _roll_back(source, undo)
        raise
    done = staging(source, "del")  # complete: the old elements go
    undo.rename(done)
    shutil.rmtree(done, ignore_errors=True)


def _roll_back(source: Path, undo: Path) -> None:
    """Undo an interrupted :func:`_write_in_place` from its folder ``undo``: the elements it wrote are removed, those
    it moved aside and the root metadata are put back."""
    import json
    import shutil

    from c3diff._atomic import remove_folder

    journal = json.loads((undo / "journal.json").read_text())
    for kind, name in journal["written"]:
        shutil.rmtree(source / kind / name, ignore_errors=True)
    for kind, name in journal["moved"]:
        if (undo / kind / name).exists():
            (undo / kind / name).rename(source / kind / name)
    for name in _ROOT_METADATA:
        if (undo / name).exists():
            shutil.copy2(undo / name, source / name)
    remove_folder(undo)


def _recover_store(source: Path) -> None:
    """Roll back what a ``c3diff predict`` killed while writing into ``source`` left (see :func:`_write_in_place`)."""
    import os
    import shutil

    from c3diff._atomic import process_alive, recover

    for undo in sorted(source.parent.glob(f".{source.name}.c3diff-undo-*")):
        pid = undo.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and process_alive(int(pid))):
            continue  # another predict is writing into the store right now
        if (undo / "journal.json").exists():
            print(f"Restoring {str(source)!r} as it was before an interrupted `c3diff predict`.", file=sys.stderr)
            _roll_back(source, undo)
        else:  # killed before it moved anything
            shutil.rmtree(undo, ignore_errors=True)
    recover(source)  # folders of finished writes a kill left half-deleted


def _run_fit(args: argparse.Namespace) -> int:
    from c3diff.tl import fit_slide

    if args.minutes is not None and not args.minutes > 0:
        raise UsageError(f"--minutes must be a positive number, got {args.minutes}.")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} already exists and is not an empty folder; choose a new folder.")
    sdata = _read_store(Path(args.input), what="INPUT")
    model = fit_slide(
        sdata,
        args.image_key,
        table_key=args.table_key,
        genes=args.genes,
        pool=args.pool,
        model=args.model,
        steps=args.steps,
        max_time=None if args.minutes is None else 60.0 * args.minutes,
        seed=args.seed,
        progress=not args.quiet,
        output_dir=out,
    )
    history = model.fit_history
    print(
        f"Fitted {len(model.genes)} genes in {len(history)} step(s) (loss {history[0]:.4f} -> {history[-1]:.4f}); "
        f"model in {out}"
    )
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from c3diff._demo import run_demo

    run_demo(
        output=Path(args.output),
        seed=args.seed,
        size=args.size,
        steps=args.steps,
        n_samples=args.samples,
        model=args.model,
        progress=not args.quiet,
    )
    return 0


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error_message(err: BaseException) -> str:
    """The message of an exception as one line (a ``KeyError``'s message without the quotes ``str`` adds)."""
    message = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err
    message = _one_line(message)
    if isinstance(err, (UsageError, *_USER_ERRORS)) and message:
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


@contextlib.contextmanager
def _console(verbose: bool) -> Iterator[None]:
    """Warnings as one line ``c3diff: warning: ...`` (each message once, no source line), unless verbose."""
    if verbose:
        yield
        return
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = _one_line(message)
        if text not in seen:
            seen.add(text)
            print(f"c3diff: warning: {text}", file=sys.stderr if file is None else file)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``c3diff`` command.

    Every error is reported as one line ``c3diff COMMAND: error: ...`` on stderr with exit code 1 (130 when
    interrupted); ``--verbose`` adds the traceback. Warnings are printed as ``c3diff: warning: ...``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    runners = {"demo": _run_demo, "predict": _run_predict, "train": _run_train, "fit": _run_fit}
    verbose = bool(getattr(args, "verbose", False))
    with _console(verbose):
        try:
            return runners[args.command](args)
        except KeyboardInterrupt:
            print(f"c3diff {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - the command line reports every error as one line
            if verbose:
                import traceback

                traceback.print_exc()
            expected = isinstance(err, (UsageError, *_USER_ERRORS))
            hint = "" if verbose or expected else " (run with --verbose for details)"
            if isinstance(err, MemoryError):
                hint = " (out of memory: fewer genes, a smaller --batch-size or a machine with more memory)"
            print(f"c3diff {args.command}: error: {_error_message(err)}{hint}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
