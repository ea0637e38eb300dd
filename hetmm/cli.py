"""``hetmm`` command line: pipeline stages per product line, prediction, hot update and audit.

Heavy imports (torch, great-expectations) happen inside the commands, so ``hetmm --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from hetmm.modes import DataSource
from hetmm.pipeline.stages import STAGES

HELP_FLAGS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(help="Training-free defect inspection (HETMM) as a per-product-line pipeline.",
                  no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP_FLAGS)


def _version(value: bool) -> None:
    if value:
        from hetmm import __version__

        typer.echo(f"hetmm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                                help="Print the version and exit")] = False) -> None:
    """Training-free defect inspection (HETMM) as a per-product-line pipeline."""

LineArg = Annotated[str, typer.Argument(metavar="LINE", help="Product line name from params.yaml")]
ParamsOpt = Annotated[Path, typer.Option("--params", metavar="FILE", help="params.yaml to read")]
RootOpt = Annotated[Path, typer.Option("--root", metavar="DIR",
                                       help="Repository root holding data/, models/, reports/")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", metavar="auto|cpu|cuda",
                                                          help="Where to compute (default: params.yaml)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress bars")]
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
PARTLY_FAILED = 3  # hetmm predict: some images could not be read, the others were inspected
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON (default: readable lines)")]


def _friendly(fn: Callable) -> Callable:
    """Print library errors as one line naming the file or key, exit 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from hetmm.errors import HetmmError
        from hetmm.io import clean_text

        try:
            return fn(*args, **kwargs)
        except HetmmError as exc:
            typer.echo(f"error: {clean_text(str(exc))}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # the file system refused (read-only folder, full disk): the file and why, no traceback
            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(clean_text(f"error: {where}{exc.strerror or exc}; fix the file or folder and rerun"), err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # Ctrl-C: every artifact is written atomically, so nothing half-written is left
            typer.echo("interrupted: nothing half-written was kept; run the command again to go on", err=True)
            raise typer.Exit(INTERRUPTED) from None

    return wrapper


def _context(params_path: Path, root: Path, line_name: str):
    from hetmm.config import load_params
    from hetmm.pipeline.line import LinePaths
    from hetmm.pipeline.settings import effective_line

    params = load_params(params_path)
    paths = LinePaths.for_line(line_name, root)
    return params, effective_line(params.line(line_name), paths.settings), paths


def _show(result: dict, as_json: bool) -> None:
    from hetmm.io import clean_text
    from hetmm.report.console import render

    typer.echo(json.dumps(result, indent=2, default=str) if as_json else clean_text(render(result)))


STAGE_HELP = {
    "download": f"Fetch the line's images (source {', '.join(DataSource)}) into data/<line>/ with a manifest: demo "
                "is embedded; folder reads data.path (MVTec layout), anomalib_folder data.normal_dir, abnormal_dir, "
                "mask_dir, normal_test_dir, unlabelled_dir, table data.path (CSV or parquet), mvtec data.category; "
                "mvtec and mtd read data.mirror or $HETMM_MIRROR offline. A source missing on this machine fails "
                "unless HETMM_KEEP_COPY=1 keeps the last good copy.",
    "validate": "Check the manifest and every image and mask (great-expectations); fails naming the bad files.",
    "tune": "Choose the settings params.yaml leaves open on good training images and synthetic defects.",
    "extract": "Compute features for images not yet in the per-image feature cache.",
    "template": "Build the ALL, PTS or COVER template, or hot-update the previous one (method hetmm).",
    "train": "Train TFA-Net on the good training images, resuming an unfinished run (method tfa_net).",
    "calibrate": "Thresholds from held-out good training images and synthetic defects (no test labels).",
    "infer": "Score the test split: image scores and anomaly maps.",
    "report": "Metrics, threshold, curves, overlays, per-defect table and model card.",
}


def _run_stages(names: tuple[str, ...], line: str, params: Path, root: Path, device: str | None,
                quiet: bool) -> dict:
    from hetmm.config import load_params
    from hetmm.io import remove_stale_temps
    from hetmm.pipeline.line import StageRun
    from hetmm.pipeline.lock import line_lock
    from hetmm.pipeline.stages import stage

    loaded = load_params(params)
    loaded.line(line)  # a bad name or entry fails before the lock is taken
    result: dict = {}
    with line_lock(root, line):
        remove_stale_temps(*(root / folder / line for folder in ("data", "features", "models", "outputs", "reports")))
        for name in names:  # each stage's context is made when it starts: ``tune`` writes what the next ones read
            result = stage(name)(StageRun.for_line(loaded, line, root, device, progress=not quiet, stage=name))
    return {k: v for k, v in result.items() if k != "subsets"}


def _stage_command(name: str) -> None:
    def command(line: LineArg, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."),
                device: DeviceOpt = None, quiet: QuietOpt = False, as_json: JsonOpt = False):
        _show(_run_stages((name,), line, params, root, device, quiet), as_json)

    command.__doc__ = STAGE_HELP[name]
    command.__name__ = name
    app.command(name)(_friendly(command))


for _name in STAGES:
    _stage_command(_name)


@app.command()
@_friendly
def run(line: LineArg, params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."),
        device: DeviceOpt = None, quiet: QuietOpt = False, as_json: JsonOpt = False):
    """All of the line's stages in order without DVC (DVC users run `dvc repro`)."""
    from hetmm.config import load_params
    from hetmm.pipeline.stages import stages_for

    _show(_run_stages(stages_for(load_params(params).line(line).method), line, params, root, device, quiet), as_json)


@app.command()
@_friendly
def predict(
    line: LineArg,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files or folders to inspect")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR",
                                      help="Folder for predictions.csv/json, masks and overlays")] =
    Path("predictions"),
    template_path: Annotated[Optional[Path], typer.Option("--template", metavar="FILE", help="Template file")] = None,
    threshold: Annotated[Optional[float], typer.Option(metavar="SCORE",
                                                       help="Image-score threshold (default: the saved one)")] =
    None,
    params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."), device: DeviceOpt = None,
    quiet: QuietOpt = False, as_json: JsonOpt = False,
):
    """Inspect new images with a saved template and threshold: per image the verdict, score, defect area, mask and
    overlay. A file that cannot be read is reported and the others are inspected; the exit code is then 3."""
    from hetmm.pipeline.lock import line_lock
    from hetmm.pipeline.predict import format_predictions, predict_images

    p, cfg, paths = _context(params, root, line)
    with line_lock(root, line):
        summary = predict_images(cfg, paths, images, out, template_path=template_path, threshold=threshold,
                                 device=device or p.device, progress=not quiet, cluster_config=p.cluster)
    typer.echo(json.dumps(summary, indent=2, default=str) if as_json else format_predictions(summary))
    if summary["failed"]:
        raise typer.Exit(PARTLY_FAILED)


@app.command()
@_friendly
def update(
    line: LineArg,
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="New good images (files or folders)")],
    template_path: Annotated[Optional[Path], typer.Option("--template", metavar="FILE",
                                                                help="Template to update in place")] =
    None,
    params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path("."), device: DeviceOpt = None,
    quiet: QuietOpt = False, as_json: JsonOpt = False,
):
    """Hot-update a saved template with new good images (no rebuild; the file is replaced atomically)."""
    from hetmm.errors import HetmmError
    from hetmm.pipeline.lines import dvc_lines
    from hetmm.pipeline.lock import line_lock
    from hetmm.pipeline.predict import update_template

    p, cfg, paths = _context(params, root, line)
    dvc_yaml = root / "dvc.yaml"
    if template_path is None and dvc_yaml.is_file() and line in dvc_lines(dvc_yaml):
        # the next `dvc repro` would rebuild the template from the line's data and silently drop the update
        raise HetmmError(f"line {line!r} is run by {dvc_yaml}: the next `dvc repro` would rebuild "
                         f"models/{line}/template.pt from the line's data and drop this update; add the images to "
                         f"the line's source (train/good/ of a folder source) and run `dvc repro report@{line}`, or "
                         "pass --template to update a copy")
    with line_lock(root, line):
        _show(update_template(cfg, paths, images, template_path=template_path, device=device or p.device,
                              progress=not quiet), as_json)


line_app = typer.Typer(help="Add product lines and check that params.yaml and dvc.yaml agree.", no_args_is_help=True,
                       context_settings=HELP_FLAGS)
app.add_typer(line_app, name="line")
DvcOpt = Annotated[Path, typer.Option("--dvc", metavar="FILE", help="dvc.yaml to update")]


@line_app.command("add")
@_friendly
def line_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="New line name: letters, digits, '-' and '_'")],
    source: Annotated[str, typer.Option(
        metavar="SOURCE", help=f"Where the images come from: {', '.join(DataSource)}"
    )] = DataSource.FOLDER,
    path: Annotated[Optional[str], typer.Option(
        metavar="PATH", help="folder: an MVTec-layout tree; table: the CSV/parquet file")] = None,
    normal_dir: Annotated[Optional[str], typer.Option(metavar="DIR", help="anomalib_folder: good images")] = None,
    abnormal_dir: Annotated[Optional[str], typer.Option(metavar="DIR", help="anomalib_folder: defect images")] = None,
    mask_dir: Annotated[Optional[str], typer.Option(metavar="DIR", help="anomalib_folder: their masks")] = None,
    normal_test_dir: Annotated[Optional[str], typer.Option(
        metavar="DIR", help="anomalib_folder: good test images (default: a share of --normal-dir)")] = None,
    unlabelled_dir: Annotated[Optional[str], typer.Option(
        metavar="DIR", help="anomalib_folder: test images without a label")] = None,
    masks: Annotated[Optional[str], typer.Option(metavar="required|optional|none",
                                                 help="Defect images without masks (default: optional)")] = None,
    category: Annotated[Optional[str], typer.Option(metavar="NAME", help="mvtec source: the category")] = None,
    mirror: Annotated[Optional[str], typer.Option(metavar="DIR", help="mtd/mvtec: a local copy")] = None,
    method: Annotated[str, typer.Option(metavar="hetmm|tfa_net", help="How the line scores images")] = "hetmm",
    params: ParamsOpt = Path("params.yaml"), dvc: DvcOpt = Path("dvc.yaml"), as_json: JsonOpt = False,
):
    """Add a line: its complete params entry (every key at its default) and its name in dvc.yaml's line list."""
    from hetmm.pipeline.lines import add_line

    given = {"source": source, "path": path, "category": category, "mirror": mirror, "normal_dir": normal_dir,
             "abnormal_dir": abnormal_dir, "mask_dir": mask_dir, "normal_test_dir": normal_test_dir,
             "unlabelled_dir": unlabelled_dir, "masks": masks}
    data = {k: v for k, v in given.items() if v is not None}
    _show(add_line(name, data, params, dvc, method), as_json)


@line_app.command("remove")
@_friendly
def line_remove(name: Annotated[str, typer.Argument(metavar="NAME", help="The line to take out")],
                params: ParamsOpt = Path("params.yaml"), dvc: DvcOpt = Path("dvc.yaml"), as_json: JsonOpt = False):
    """Remove a line: its params entry (other entries and comments untouched) and its name in dvc.yaml's lists."""
    from hetmm.pipeline.lines import remove_line

    _show(remove_line(name, params, dvc), as_json)


@line_app.command("check")
@_friendly
def line_check(params: ParamsOpt = Path("params.yaml"), dvc: DvcOpt = Path("dvc.yaml"), as_json: JsonOpt = False):
    """Compare the lines of params.yaml with the list dvc.yaml runs; exit 1 if they differ or a name is unsafe."""
    from hetmm.pipeline.lines import check_lines

    found = check_lines(params, dvc)
    _show(found, as_json)
    if any(found.values()):
        raise typer.Exit(1)


exp_app = typer.Typer(help="DVC experiments, with the params files kept when one fails.", no_args_is_help=True,
                      context_settings=HELP_FLAGS)
app.add_typer(exp_app, name="exp")


@exp_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def exp_run(ctx: typer.Context):
    """`dvc exp run ARGS...` (e.g. `report@demo -S product_lines.demo.templates.size=20`); when it fails, params.yaml
    is written back byte for byte as it was before, and the exit code is DVC's."""
    from hetmm.pipeline.experiments import run_experiment

    code, restored = run_experiment(list(ctx.args))
    for path in restored:
        typer.echo(f"hetmm: the experiment failed (exit {code}); {path} is back as it was before it", err=True)
    raise typer.Exit(code)


@exp_app.command("show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def exp_show(ctx: typer.Context,
             all_lines: Annotated[bool, typer.Option("--all-lines", metavar="",
                                                     help="A metrics column for every line")] = False,
             as_json: JsonOpt = False):
    """Experiments side by side, readable: the params.yaml keys that differ and each line's image AUROC / pixel
    AUROC / AU-PRO in one cell. Other arguments go to `dvc exp show` (e.g. -A, -n 5)."""
    from hetmm.pipeline.experiments import format_experiments, show_experiments

    rows = show_experiments(list(ctx.args))
    typer.echo(json.dumps(rows, indent=2) if as_json else format_experiments(rows, all_lines))


@app.command()
@_friendly
def audit(
    line: Annotated[Optional[str], typer.Argument(metavar="LINE", help="Only this product line")] = None,
    since: Annotated[Optional[str], typer.Option(metavar="DATE",
                                                 help="Versions in use from this ISO date or date-time on")] = None,
    until: Annotated[Optional[str], typer.Option(metavar="DATE",
                                                 help="... up to this ISO date (inclusive) or date-time")] = None,
    all_refs: Annotated[bool, typer.Option("--all-refs", metavar="",
                                           help="Every branch, tag and DVC experiment (default: the current branch)")]
    = False,
    root: RootOpt = Path("."),
    as_json: JsonOpt = False,
):
    """Every template version in use on the current branch (--all-refs: on every branch and experiment) per product
    line: commit, author, date, data and template hashes, code version, params, threshold and metrics."""
    from hetmm.config import check_line_name
    from hetmm.errors import HetmmError
    from hetmm.io import clean_text
    from hetmm.report.audit import audit_history, format_table, parse_when

    if line is not None:
        check_line_name(line)
    malformed: list[str] = []
    rows = audit_history(root, line, parse_when(since, "--since"), parse_when(until, "--until", end=True), all_refs,
                         malformed)
    if line and not rows and not malformed:
        known = sorted({r["line"] for r in audit_history(root, all_refs=True)})
        raise HetmmError(f"no model card of line {line!r} in the git history of {root} for that period (lines with "
                         f"model cards: {', '.join(known) or 'none'}); commit reports/{line}/model_card.json after "
                         "`dvc repro`")
    typer.echo(json.dumps(rows, indent=2) if as_json else clean_text(format_table(rows, all_refs)))
    if malformed:  # the versions above are complete; these commits hold no readable card
        more = f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""
        raise HetmmError(f"{malformed[0]}{more}: committed model card is not a JSON object, left out of the audit; "
                         "regenerate it with `dvc repro report@<line>` and commit it (git history keeps the bad one)")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
