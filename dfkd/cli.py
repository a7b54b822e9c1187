"""The `dfkd` command: thin typer commands that parse, validate and call library functions."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dfkd.carbon.config import CarbonConfig
from dfkd.config.overrides import apply_overrides, config_dict
from dfkd.config.recipe import EMBEDDED_TEACHER_PATH
from dfkd.distributed import check_single_process, current_world, job_error, world_from_env, world_of
from dfkd.errors import DfkdError
from dfkd.files import ensure_writable, sha256_file
from dfkd.models import list_models, model_spec
from dfkd.rundir import RunDir, default_run_dir

# Heavy modules (torch, kornia, codecarbon) are imported inside the commands that need them, so
# `dfkd --help`, `dfkd report`, `dfkd audit` and `dfkd validate` start fast and run without torch.

# Plain click help (no rich panels): flags without a `<bool>` placeholder, choices listed, and text that
# wraps at any terminal width; `-h` as well as `--help`, as most command-line tools accept.
_APP_STYLE: dict[str, Any] = {
    "no_args_is_help": True,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 100},
}
app = typer.Typer(
    add_completion=False, help="Data-free knowledge distillation with per-stage carbon accounting.", **_APP_STYLE
)
teacher_app = typer.Typer(help="Train a teacher on real data.", **_APP_STYLE)
checkpoint_app = typer.Typer(help="Inspect and import checkpoints.", **_APP_STYLE)
study_app = typer.Typer(help="Studies that compare runs of one recipe.", **_APP_STYLE)
benchmark_app = typer.Typer(help="Measure what models cost to run.", **_APP_STYLE)
app.add_typer(teacher_app, name="teacher")
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(study_app, name="study")
app.add_typer(benchmark_app, name="benchmark")

out = Console()
err = Console(stderr=True)
_state = {"debug": False}


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version

        out.print(f"dfkd {version('dfkd')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print dfkd's version and exit."
    ),
) -> None:
    _state["debug"] = debug


# The packages `dfkd report`, `audit` and `validate` run without; every other command needs them.
_HEAVY_PACKAGES = ("torch", "torchvision", "kornia", "codecarbon")


def _one_line(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, DfkdError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in _HEAVY_PACKAGES:
        return (
            f"this command needs {exc.name}, which is not installed here: pip install -e . "
            "(dfkd report, audit and validate run without it)"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}: free some space and rerun the same command to resume"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}: check the path (a file, not a folder) and its permissions"
    return None


# The commands built to run as the ranks of a torchrun job; every other command refuses a world of several.
_MULTI_PROCESS = ("synthesize_command", "distill_command", "run_command")


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user's error into one line on stderr and exit code 2 (a traceback only with --debug).

    User errors are a `DfkdError`, a missing heavy package, and a file-system error on a named path (a full
    disk, a folder where a file belongs, no permission). Every file is written atomically, so a run resumes
    once the cause is fixed. Under torchrun an error every rank stops on is printed once, by the rank that
    found it.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with world_of(world_from_env()):
                if command.__name__ not in _MULTI_PROCESS:
                    check_single_process(f"dfkd {command.__name__.removesuffix('_command').replace('_', ' ')}")
                return command(*args, **kwargs)
        except (DfkdError, OSError, ModuleNotFoundError) as exc:
            message = _one_line(exc)
            if _state["debug"] or message is None:
                raise
            if not getattr(exc, "quiet", False):
                # Text, not markup: a message may hold brackets (a path, a TOML section) that rich would eat.
                err.print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def job_default_run_dir(name: str) -> Path:
    """`runs/<name>-<time>` for one process; a torchrun job must name its run dir (each rank's clock would
    name its own)."""
    if current_world().several:
        raise job_error("under torchrun, name the run dir with --run-dir (each rank would pick its own default)")
    return default_run_dir(name)


def carbon_config(pue: float, country: str, grid: float | None) -> CarbonConfig:
    return apply_overrides(
        CarbonConfig(), {"pue": pue, "country": country.upper(), "grid_g_per_kwh": grid}, "carbon setting"
    )


PUE = typer.Option(1.67, "--pue", help="Power usage effectiveness applied to measured energy (paper: 1.67).")
COUNTRY = typer.Option("USA", "--country", help="ISO-3166 alpha-3 code of the grid (codecarbon offline energy mix).")
GRID = typer.Option(
    None, "--grid-intensity", help="Explicit grid carbon intensity in g CO2eq/kWh (overrides --country)."
)
JSON = typer.Option(False, "--json", help="Quiet machine-readable JSON on stdout.")
YES = typer.Option(
    False, "--yes", "-y", help="Start even when the job is estimated to take over an hour on a CPU (no question)."
)
# A CPU job estimated (from a measured probe) to take longer than this asks first, or needs --yes.
CPU_LIMIT_S = 3600.0
# The synthesis methods, as the help lists them (a test keeps this equal to the synthesizer registry).
Method = Literal["cmi", "deepinversion", "fast"]
T = TypeVar("T")


def with_cost_guard(call: Callable[[float | None], T], yes: bool, as_json: bool) -> T:
    """`call(limit)`; a CPU job estimated over `CPU_LIMIT_S` needs --yes, or a yes at the prompt in a terminal."""
    from dfkd.errors import TooCostly

    if yes:
        return call(None)
    try:
        return call(CPU_LIMIT_S)
    except TooCostly as exc:
        if as_json or not sys.stdin.isatty():
            raise
        if not typer.confirm(f"{exc}. Start it anyway?", err=True):
            raise typer.Exit(2) from None
        return call(None)


DEVICE = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda or cuda:N.")


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command("models")
@user_errors
def models_command(
    name: str | None = typer.Argument(
        None, help="One model to describe: a built-in name, torchvision:<name> or timm:<name> (timm needs dfkd[timm])."
    ),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes to build it with, for its size and FLOPs."),
    as_json: bool = JSON,
) -> None:
    """List the built-in architectures (and how to name the zoos'), or describe one model."""
    if name is not None:
        from dfkd.models.describe import describe_model

        info = describe_model(name, num_classes)
        if as_json:
            print_json(info)
            return
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) else value
            out.print(f"  {key:<24} {shown}", highlight=False, markup=False, soft_wrap=True)
        return
    rows = [
        {
            "name": n,
            "description": model_spec(n).description,
            "params_at_10_classes": model_spec(n).params_at_10_classes,
        }
        for n in list_models()
    ]
    if as_json:
        print_json(rows)
        return
    table = Table("name", "description", "params (10 classes)")
    for row in rows:
        table.add_row(
            str(row["name"]),
            str(row["description"]),
            f"{row['params_at_10_classes']:,}" if row["params_at_10_classes"] else "",
        )
    out.print(table)
    out.print(
        "Any torchvision classifier is torchvision:<name> (e.g. torchvision:resnet18), any timm model timm:<name> "
        "(pip install 'dfkd[timm]'); `dfkd models NAME` describes one.",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@teacher_app.command("train")
@user_errors
def teacher_train(
    data: Path = typer.Option(..., "--data", help="CIFAR python folder or ImageFolder root with train/ and test/."),
    out_path: Path = typer.Option(..., "--out", help="Where to write the .safetensors checkpoint."),
    arch: str = typer.Option("wrn40_2", "--arch", help="Model architecture (see `dfkd models`)."),
    epochs: int = typer.Option(200, "--epochs", help="Training epochs (200 is the paper's: a GPU job)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Training batch."),
    lr: float = typer.Option(0.1, "--lr", help="Learning rate at batch 128, scaled linearly with --batch-size."),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", help="Epochs of linear lr warm-up before the cosine."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, data order and augmentation."),
    eval_every: int = typer.Option(10, "--eval-every", help="Report test accuracy every N epochs."),
    train_subset: int = typer.Option(
        0, "--train-subset", help="Train on a class-balanced slice of N images (0 = all)."
    ),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the model on CUDA (faster after a one-off compile)."
    ),
    run: Path | None = typer.Option(
        None, "--run", "--run-dir", help="Run dir for the ledger and manifest (default: runs/teacher-<arch>-<time>)."
    ),
    device: str = DEVICE,
    pue: float = PUE,
    country: str = COUNTRY,
    grid: float | None = GRID,
    as_json: bool = JSON,
) -> None:
    """Train a teacher with the standard CIFAR recipe; metered as stage `teacher-training`."""
    from dfkd.config.teacher import TeacherConfig
    from dfkd.data import check_data_path
    from dfkd.device import resolve_device
    from dfkd.stages.runner import run_metered
    from dfkd.stages.teacher import teacher_flops, train_teacher

    if out_path.suffix != ".safetensors":
        raise DfkdError(f"--out {out_path} must end in .safetensors")
    config = apply_overrides(
        TeacherConfig(),
        {
            "arch": arch,
            "data": str(data),
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_epochs": warmup_epochs,
            "seed": seed,
            "device": device,
            "eval_every": eval_every,
            "train_subset": train_subset,
            "compile": compile_model,
        },
        "teacher setting",
    )
    carbon = carbon_config(pue, country, grid)
    torch_device = resolve_device(device)
    check_data_path(data)
    ensure_writable(out_path)  # here, not when the trained model is saved hours later
    run_dir = RunDir.open(run or default_run_dir(f"teacher-{arch}"))
    with run_dir.locked():
        run_dir.update_manifest(carbon=config_dict(carbon))
        report = run_metered(
            run_dir,
            "teacher-training",
            carbon,
            torch_device,
            {"arch": arch},
            lambda: train_teacher(config, out_path, run_dir, show_progress=not as_json),
            teacher_flops(config),
        )
    summary = {"checkpoint": str(out_path), "test_acc": report.result["test_acc"], "run": str(run_dir.root)}
    if as_json:
        print_json(summary)
    else:
        out.print(
            f"wrote {out_path} (test accuracy {report.result['test_acc']:.2f} %); ledger in {run_dir.ledger_path}"
        )


@app.command("evaluate")
@user_errors
def evaluate_command(
    model: Path = typer.Argument(..., help="A .safetensors checkpoint."),
    data: Path = typer.Option(..., "--data", help="Dataset whose test split is used."),
    device: str = DEVICE,
    as_json: bool = JSON,
) -> None:
    """Top-1 accuracy, per-class precision/recall/F1, Cohen's kappa and the confusion matrix."""
    from dfkd import api

    metrics = api.evaluate(model, data, device=device, progress=not as_json)
    if as_json:
        print_json(metrics)
        return
    out.print(
        f"[bold]{model}[/bold] on {metrics['data']}: top-1 {metrics['accuracy']:.2f} %  "
        f"kappa {metrics['kappa']:.4f}  ({metrics['count']} images)"
    )
    table = Table("class", "precision %", "recall %", "F1 %", "support", title="per class")
    for row in metrics["per_class"]:
        table.add_row(
            row["name"], f"{row['precision']:.2f}", f"{row['recall']:.2f}", f"{row['f1']:.2f}", str(row["support"])
        )
    table.add_row(
        "macro",
        f"{metrics['macro_precision']:.2f}",
        f"{metrics['macro_recall']:.2f}",
        f"{metrics['macro_f1']:.2f}",
        str(metrics["count"]),
    )
    out.print(table)
    names = [row["name"][:6] for row in metrics["per_class"]]
    confusion = Table("true \\ pred", *names, title="confusion matrix")
    for name, counts in zip(names, metrics["confusion_matrix"]):
        confusion.add_row(name, *map(str, counts))
    out.print(confusion)


@app.command("export")
@user_errors
def export_command(
    source: Path = typer.Argument(..., help="A run dir (its distilled student) or a .safetensors checkpoint."),
    fmt: Literal["onnx", "torchscript", "exported-program"] = typer.Option(
        ..., "--format", help="onnx (onnxruntime), torchscript (torch.jit) or exported-program (torch.export, .pt2)."
    ),
    out_file: Path | None = typer.Option(
        None,
        "--out",
        help="The file to write: .onnx, .pt or .pt2 by format (required for a checkpoint).",
        show_default="RUN/export/student.<suffix>",
    ),
    quantize: Literal["dynamic"] | None = typer.Option(
        None, "--quantize", help="dynamic: int8 weights (onnx only; its accuracy is measured with --data)."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Check on this dataset's test images (and measure int8 accuracy on its test split)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N: where torchscript and .pt2 run."),
    as_json: bool = JSON,
) -> None:
    """One deployable file taking float RGB in [0, 1] (normalisation folded in), kept only once it matches the
    PyTorch model in its own runtime."""
    from dfkd import api

    result = api.export(source, format=fmt, out=out_file, quantize=quantize, data=data, device=device)
    if as_json:
        print_json(result)
        return
    opset = f", opset {result['opset']}" if "opset" in result else ""
    sizes = " and ".join(map(str, result["batch_sizes_checked"]))
    out.print(
        f"wrote {result['path']} ({result['format']}{opset}{', int8 weights' if quantize else ''}, "
        f"{result['bytes']:,} bytes, sha256 {result['sha256']}): max abs difference {result['max_abs_diff']:.2g} "
        f"from the PyTorch model on {result['checked_on']}, batches of {sizes}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if quantize:
        accuracy = result.get("accuracy")
        measured = (
            f"; accuracy on {accuracy['images']} test images {accuracy['fp32']:.2f} % fp32, {accuracy['int8']:.2f} % "
            f"int8 ({accuracy['change_pp']:+.2f} pp)"
            if accuracy
            else ""
        )
        out.print(
            f"int8 top-1 agrees with fp32 on {result['top1_agreement']:.1f} % of them{measured}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


@checkpoint_app.command("info")
@user_errors
def checkpoint_info(path: Path = typer.Argument(..., help="A .safetensors checkpoint."), as_json: bool = JSON) -> None:
    """Print a checkpoint's validated metadata and sha256; exit 2 when it would not load."""
    from dfkd.checkpoints import load_checkpoint

    model, meta = load_checkpoint(path)  # everything `load` checks: metadata, tensor names and shapes
    parameters = sum(p.numel() for p in model.parameters())
    digest = sha256_file(path)
    if as_json:
        print_json({**meta.to_json(), "parameters": parameters, "sha256": digest, "path": str(path)})
        return
    # One `key value` line each, never a table cell: a sha256 cut short cannot be compared with the one an
    # auditor holds.
    out.print(str(path), highlight=False, markup=False, soft_wrap=True)
    for key, value in {**meta.to_strings(), "parameters": f"{parameters:,}", "sha256": digest}.items():
        out.print(f"  {key:<18} {value}", highlight=False, markup=False, soft_wrap=True)


@checkpoint_app.command("import")
@user_errors
def checkpoint_import(
    src: Path = typer.Argument(
        ..., help="A .pth/.pt (a state dict or {'state_dict': ...}, read with weights_only=True) or a .safetensors."
    ),
    dst: Path = typer.Argument(..., help="The .safetensors file to write (not the source itself)."),
    arch: str = typer.Option(..., "--arch", help="Architecture the weights belong to (see dfkd models)."),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes the weights predict."),
    input_size: int | None = typer.Option(
        None, "--input-size", help="Side of the square images the weights were trained on.", show_default="the arch's"
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        help="Name of the data the weights were trained on.",
        show_default="cifar10 for the built-ins, else 'unnamed'",
    ),
    mean: str | None = typer.Option(
        None,
        "--mean",
        help="Input normalisation mean, 3 values.",
        show_default="the arch's: CIFAR-10's for the built-ins",
    ),
    std: str | None = typer.Option(
        None,
        "--std",
        help="Input normalisation std, 3 values.",
        show_default="the arch's: CIFAR-10's for the built-ins",
    ),
    class_names: Path | None = typer.Option(
        None, "--class-names", help="Text file of the class names in label order, one a line; recorded for reports."
    ),
    test_acc: float | None = typer.Option(None, "--test-acc", help="Known test accuracy in %, recorded in metadata."),
    as_json: bool = JSON,
) -> None:
    """Convert another tool's weights to a validated .safetensors checkpoint; nothing is written on any error."""
    from dfkd.checkpoints import CheckpointMeta, import_checkpoint, read_class_names

    spec = model_spec(arch)
    meta = CheckpointMeta.from_strings(
        {
            "arch": arch,
            "num_classes": str(num_classes),
            "input_size": str(spec.input_size if input_size is None else input_size),
            "mean": mean if mean is not None else ",".join(map(str, spec.mean)),
            "std": std if std is not None else ",".join(map(str, spec.std)),
            "dataset": dataset or ("unnamed" if ":" in arch else "cifar10"),
            **({"test_acc": str(test_acc)} if test_acc is not None else {}),
        },
        "given on the command line",
    )
    if class_names is not None:
        meta = dataclasses.replace(meta, class_names=read_class_names(class_names, meta.num_classes))
    digest = import_checkpoint(src, dst, meta)
    if as_json:
        print_json({"path": str(dst), "sha256": digest})
    else:
        out.print(f"wrote {dst} (sha256 {digest})")


@app.command("synthesize")
@user_errors
def synthesize_command(
    method: Method = typer.Option("cmi", "--method", help="Synthesis method (see README)."),
    teacher: Path = typer.Option(
        EMBEDDED_TEACHER_PATH,
        "--teacher",
        help="Teacher checkpoint (.safetensors).",
        show_default="the embedded checkpoints/wrn40_2_cifar10.safetensors",
    ),
    num_images: int = typer.Option(50_000, "--num-images", help="How many synthetic images to make."),
    batch_size: int = typer.Option(
        256, "--batch-size", help="Synthesis batch (independent of the distillation batch)."
    ),
    iterations: int | None = typer.Option(
        None, "--iterations", help="Optimisation steps per batch (default: the method's published setting)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: batch b is seeded with (seed, b), so a resume is exact."),
    run: Path | None = typer.Option(
        None,
        "--run",
        "--run-dir",
        help="Run dir (default: runs/<method>-<time>); under torchrun spell it --run-dir "
        "(torchrun reads --run as its own --run-path).",
    ),
    settings: list[str] | None = typer.Option(
        None,
        "--set",
        help="Method setting key=value, e.g. nz=256 (or as a recipe names it: synthesize.settings.nz=256); repeatable.",
    ),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the teacher on CUDA (the method setting compile=true)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard existing synthetic data in the run dir and start over."
    ),
    yes: bool = YES,
    device: str = DEVICE,
    pue: float = PUE,
    country: str = COUNTRY,
    grid: float | None = GRID,
    as_json: bool = JSON,
) -> None:
    """Invert the teacher into synthetic image shards; metered as stage `synthesis`. Resumes by default."""
    from dfkd import api
    from dfkd.config.overrides import parse_set_options

    result = with_cost_guard(
        lambda limit: api.synthesize(
            run or job_default_run_dir(method),
            method=method,
            teacher=teacher,
            num_images=num_images,
            batch_size=batch_size,
            iterations=iterations,
            seed=seed,
            device=device,
            settings={
                **({"compile": "true"} if compile_model else {}),
                **parse_set_options(settings, "synthesize.settings"),
            },
            carbon=carbon_config(pue, country, grid),
            overwrite=overwrite,
            progress=not as_json,
            cpu_limit_s=limit,
        ),
        yes,
        as_json,
    )
    if not current_world().primary:  # the job's result, printed once
        return
    quality = result["quality"]
    if as_json:
        print_json(result)
        return
    out.print(
        f"{quality['images']} synthetic images in {Path(result['run']) / 'synthetic'}: "
        "teacher agrees with the target on "
        f"{quality['target_agreement']:.1f} %, mean confidence {quality['mean_confidence']:.3f}, "
        f"diversity (mean cosine) {quality['diversity_mean_cosine']:.3f}; preview {result['preview']}"
    )


@app.command("distill")
@user_errors
def distill_command(
    run: Path = typer.Option(
        ..., "--run", "--run-dir", help="Run dir holding the synthetic shards (from `dfkd synthesize`)."
    ),
    student: str = typer.Option("wrn16_1", "--student", help="Student architecture (see `dfkd models`)."),
    teacher: Path | None = typer.Option(
        None, "--teacher", help="Teacher checkpoint (default: the one that made the synthetic set, checked by hash)."
    ),
    tau: str = typer.Option("stochastic", "--tau", help="stochastic | a number >= 1 | grid | grid:2,4,8,16"),
    tau_range: str = typer.Option("2,20", "--tau-range", help="Range of the stochastic tau, low,high."),
    tau_per: Literal["batch", "sample"] = typer.Option(
        "batch", "--tau-per", help="batch (the paper) or sample (one tau per image; our extension)."
    ),
    loss: Literal["hkd", "cmc", "dml"] = typer.Option("hkd", "--loss", help="The KD loss (see README)."),
    alpha: float = typer.Option(0.95, "--alpha", help="Weight of the KD term in hkd."),
    epochs: int = typer.Option(200, "--epochs", help="Distillation epochs (200 is the paper's: a GPU job)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Distillation batch."),
    lr: float = typer.Option(0.1, "--lr", help="Learning rate at batch 256, scaled linearly with --batch-size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, data order, augmentation and tau."),
    data: Path | None = typer.Option(
        None, "--data", help="Train on this real data's training split instead (the data-driven KD baseline)."
    ),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Report accuracy on this data's test split."),
    val_data: Path | None = typer.Option(
        None, "--val-data", help="Pick the grid winner by accuracy on a slice of this data's training split."
    ),
    eval_every: int = typer.Option(0, "--eval-every", help="Also evaluate every N epochs (0 = only at the end)."),
    train_subset: int = typer.Option(
        0, "--train-subset", help="With --data: train on a class-balanced slice of N images (0 = all)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard this run's earlier distillation and start over."
    ),
    yes: bool = YES,
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile student and teacher on CUDA."),
    device: str = DEVICE,
    pue: float = PUE,
    country: str = COUNTRY,
    grid: float | None = GRID,
    as_json: bool = JSON,
) -> None:
    """Distil a student from the teacher on the synthetic set; metered as stage `distillation`. Resumes by default."""
    from dfkd import api

    # A real-data baseline (--data) may start a fresh run dir; data-free distillation needs the synthesis's.
    summary = with_cost_guard(
        lambda limit: api.distill(
            run,
            epochs=epochs,
            student=student,
            tau=tau,
            tau_range=tau_range,
            batch_size=batch_size,
            teacher=teacher,
            data=data,
            eval_data=eval_data,
            val_data=val_data,
            carbon=carbon_config(pue, country, grid),
            overwrite=overwrite,
            progress=not as_json,
            tau_per=tau_per,
            loss=loss,
            alpha=alpha,
            lr=lr,
            seed=seed,
            device=device,
            eval_every=eval_every,
            compile=compile_model,
            train_subset=train_subset,
            cpu_limit_s=limit,
        ),
        yes,
        as_json,
    )
    if not current_world().primary:  # the job's result, printed once
        return
    if as_json:
        print_json(summary)
        return
    accuracy = f"test accuracy {summary['test_acc']:.2f} %, " if "test_acc" in summary else ""
    winner = f"grid winner {summary['winner']} by {summary['criterion']}; " if "winner" in summary else ""
    out.print(
        f"{winner}student {Path(summary['run']) / 'student' / 'student.safetensors'}: {accuracy}"
        f"agreement with the teacher on held-out synthetic images {summary['holdout_agreement']:.2f} %"
    )


@app.command("report")
@user_errors
def report_command(
    runs: list[Path] = typer.Argument(..., help="One or more run dirs, shown side by side."),
    fmt: Literal["table", "json", "markdown", "html"] = typer.Option(
        "table", "--format", help="html is one self-contained file."
    ),
    out_file: Path | None = typer.Option(None, "--out", help="Write to this file (atomically) instead of stdout."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json, as every other command takes it."),
) -> None:
    """The per-stage carbon report: energy, CO2eq, FLOPs and results of every ledger record."""
    if as_json:
        if fmt not in ("table", "json"):
            raise DfkdError(f"--json and --format {fmt} ask for two formats: pass one of them")
        fmt = "json"
    from dfkd.files import atomic_write_bytes
    from dfkd.report.build import build_report
    from dfkd.report.render import render, render_table

    if out_file is not None:
        ensure_writable(out_file)
    report = build_report(runs)
    if out_file is None and fmt == "table":
        out.print(render_table(report))
        return
    text = render(report, fmt)
    if out_file is None:
        typer.echo(text, nl=False)
        return
    atomic_write_bytes(out_file, text.encode())
    err.print(f"wrote {out_file}", highlight=False)


@app.command("audit")
@user_errors
def audit_command(
    run: Path = typer.Argument(..., help="The run dir to verify."),
    report_file: Path | None = typer.Option(
        None, "--report", help="A saved `dfkd report --format json` to check against the run too."
    ),
    as_json: bool = JSON,
) -> None:
    """Re-hash every artifact, check the ledger's hash chain and the totals; exit 1 on any mismatch."""
    from dfkd.report.audit import audit_run, audit_scope
    from dfkd.report.build import load_report

    problems = audit_run(run, load_report(report_file) if report_file else None)
    checked = audit_scope(run, report_file is not None)
    if as_json:
        print_json({"run": str(run), "ok": not problems, "problems": problems, "checked": checked})
    else:
        for problem in problems:
            out.print(problem, markup=False, highlight=False)
        out.print(f"{'OK' if not problems else f'{len(problems)} problems'}; checked:", highlight=False)
        for line in checked:
            out.print(f"  - {line}", markup=False, highlight=False, soft_wrap=False)
    raise typer.Exit(1 if problems else 0)


RECIPE_SETS = typer.Option(None, "--set", help="Recipe override section.key=value, e.g. distill.epochs=3 (repeatable).")


def _print_run_report(runs: list[Path]) -> None:
    from dfkd.report.build import build_report
    from dfkd.report.render import render_table

    out.print(render_table(build_report(runs)))


def _dry_run(recipe_file: Path, settings: list[str] | None, run: Path | None, as_json: bool) -> None:
    from dfkd import api
    from dfkd.report.format import duration, number, si

    estimate = api.estimate(recipe_file, overrides=settings, run_dir=run)
    if as_json:
        print_json(estimate)
        return
    table = Table(
        "stage",
        "work",
        "FLOPs",
        "time",
        "kWh (PUE)",
        "CO2eq g",
        title=f"estimate: {estimate['recipe']} on {estimate['device']}",
    )
    for row in [*estimate["stages"], {"stage": "total", **estimate["total"]}]:
        work = f"{si(row['units'])} {row['unit']}s" if "units" in row else ""
        table.add_row(
            row["stage"],
            work,
            si(row["flops"]),
            duration(row["seconds"]),
            number(row["energy_kwh_with_pue"]),
            number(row["co2eq_g"]),
        )
    out.print(table)
    out.print(f"not included: {estimate['not_included']}", highlight=False, markup=False, soft_wrap=True)


@app.command("run")
@user_errors
def run_command(
    recipe_file: Path = typer.Argument(..., help="A recipe (.toml), e.g. recipes/quickstart.toml."),
    run: Path | None = typer.Option(
        None, "--run", "--run-dir", help="Run dir (default: runs/<recipe>-<time>); rerun on it to resume."
    ),
    settings: list[str] | None = RECIPE_SETS,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Run nothing: print each stage's work, FLOPs and its time, energy and CO2eq on this device, "
        "estimated from a short measured probe (with --run, also kept there for the report's estimate vs actual).",
    ),
    as_json: bool = JSON,
) -> None:
    """Run a recipe: synthesize, distill and evaluate in one run dir, each stage metered; then the carbon report."""
    from dfkd import api
    from dfkd.config.recipe import load_recipe

    recipe = load_recipe(recipe_file, settings)
    if dry_run:
        check_single_process("dfkd run --dry-run")
        _dry_run(recipe_file, settings, run, as_json)
        return
    summary = api.run(recipe_file, run or job_default_run_dir(recipe.name), overrides=settings, progress=not as_json)
    if not current_world().primary:  # the job's result, printed once
        return
    if as_json:
        print_json(summary)
        return
    _print_run_report([Path(summary["run"])])
    result, quality = summary["distillation"], summary["synthesis"]["quality"]
    accuracy = f"test accuracy {result['test_acc']:.2f} %, " if "test_acc" in result else ""
    out.print(
        f"{summary['run']}: teacher agrees with the synthetic targets on {quality['target_agreement']:.1f} %; "
        f"student {accuracy}agreement with the teacher on held-out synthetic images {result['holdout_agreement']:.2f} %"
    )


@app.command("recipes")
@user_errors
def recipes_command(as_json: bool = JSON) -> None:
    """List the shipped recipes, one line each."""
    from dfkd.config.recipe import describe, recipe_paths

    rows = [{"recipe": f"recipes/{path.name}", "description": describe(path)} for path in recipe_paths()]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        out.print(f"{row['recipe']:<52} {row['description']}", highlight=False, markup=False, soft_wrap=True)


@app.command("validate")
@user_errors
def validate_command(
    recipe_files: list[Path] | None = typer.Argument(
        None, help="Recipes to check (default: every recipe under recipes/)."
    ),
    as_json: bool = JSON,
) -> None:
    """Check recipes without running them: structure, values, and that every file they name exists
    (relative paths resolve from the recipe's folder); exit 2 on the first that fails.

    Without arguments it checks the shipped recipes, and a file missing there is noted, not an error:
    some teachers are the user's to provide.
    """
    from dfkd.config.recipe import load_recipe, missing_files, recipe_paths

    rows: list[dict[str, Any]] = []
    for path in recipe_files or recipe_paths():
        recipe = load_recipe(path)
        missing = missing_files(recipe)
        if missing and recipe_files:
            teacher_fix = (
                f" (a teacher: `{recipe.teacher.import_command()}`)" if missing[0].startswith("teacher.") else ""
            )
            raise DfkdError(
                f"{path}: {'; '.join(m + ' does not exist' for m in missing)}: provide it{teacher_fix}, or point the "
                "key at it (relative paths resolve from the recipe's folder; --set ones from the current directory)"
            )
        teacher_missing = any(m.startswith("teacher.") for m in missing)
        rows.append(
            {
                "recipe": str(path),
                "ok": True,
                "teacher_missing": teacher_missing,
                "teacher": recipe.teacher.checkpoint,
                "missing": missing,
            }
        )
    if as_json:
        print_json(rows)
        return
    for row in rows:
        note = f" ({'; '.join(row['missing'])} not found: provide it before `dfkd run`)" if row["missing"] else ""
        out.print(f"OK {row['recipe']}{note}", highlight=False, markup=False, soft_wrap=True)


@study_app.command("tau")
@user_errors
def study_tau_command(
    recipe_file: Path = typer.Argument(
        ..., help="A recipe (.toml); its [distill] tau is replaced by stochastic and by grid."
    ),
    run: Path | None = typer.Option(
        None, "--run", "--run-dir", help="Study dir holding stochastic/ and grid/ (default: runs/<recipe>-tau-<time>)."
    ),
    settings: list[str] | None = RECIPE_SETS,
    as_json: bool = JSON,
) -> None:
    """From one synthetic set, a stochastic-τ and a grid-tuned distillation, and the paper's Table-6 comparison."""
    from dfkd.config.recipe import load_recipe
    from dfkd.report.render import render_table
    from dfkd.stages.pipeline import STUDY_FILE, study_tau

    recipe = load_recipe(recipe_file, settings)
    root = run or default_run_dir(f"{recipe.name}-tau")
    report = study_tau(recipe, root, show_progress=not as_json)
    if as_json:
        print_json({"study": str(root), "comparisons": report["comparisons"]})
        return
    out.print(render_table(report))
    out.print(f"comparison saved in {root / STUDY_FILE}", highlight=False)


@benchmark_app.command("inference")
@user_errors
def benchmark_inference_command(
    teacher: Path = typer.Argument(..., help="The teacher's .safetensors checkpoint."),
    student: Path = typer.Argument(
        ..., help="The student's .safetensors checkpoint, or a run dir (its student, and its fp32 ONNX export if any)."
    ),
    run: Path | None = typer.Option(
        None,
        "--run",
        "--run-dir",
        help="Run dir whose ledger gets the record.",
        show_default="STUDENT's run dir, else runs/inference-<time>",
    ),
    data: Path | None = typer.Option(None, "--data", help="Also score both models on this dataset's test split."),
    images: int | None = typer.Option(
        None,
        "--images",
        help="Images each model's throughput is timed (and metered) over.",
        show_default="2048 CPU, 20000 CUDA",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Batch of the throughput runs.", show_default="64 CPU, 256 CUDA"
    ),
    onnx_teacher: Path | None = typer.Option(
        None, "--onnx-teacher", help="Also time this ONNX export of the teacher on onnxruntime's CPU provider."
    ),
    onnx_student: Path | None = typer.Option(
        None, "--onnx-student", help="Also time this ONNX export of the student (default: the run dir's fp32 export)."
    ),
    device: str = DEVICE,
    pue: float = PUE,
    country: str = COUNTRY,
    grid: float | None = GRID,
    as_json: bool = JSON,
) -> None:
    """Latency, throughput, size and FLOPs of a teacher and its student; metered as stage `inference-benchmark`,
    one phase per model, so `dfkd report` gives each one's energy per 1,000 inferences."""
    from dfkd import api

    result = api.benchmark_inference(
        teacher,
        student,
        run=run,
        device=device,
        data=data,
        images=images,
        batch_size=batch_size,
        onnx_teacher=onnx_teacher,
        onnx_student=onnx_student,
        carbon=carbon_config(pue, country, grid),
        progress=not as_json,
    )
    if as_json:
        print_json(result)
        return

    def latency(figures: dict[str, Any] | None) -> str:
        return "-" if figures is None else f"{figures['latency_ms']['p50']:.2f} / {figures['latency_ms']['p95']:.2f}"

    rows: dict[str, Callable[[dict[str, Any]], str]] = {
        "architecture": lambda m: m["arch"],
        "parameters": lambda m: f"{m['parameters']:,}",
        "GFLOPs per image": lambda m: f"{m['flops_per_image'] / 1e9:.4f}",
        "file MB": lambda m: f"{m['file_bytes'] / 1e6:.2f}",
        "latency p50 / p95 ms, batch 1": latency,
        f"images/s, batch {result['batch_size']}": lambda m: f"{m['throughput_images_per_s']:,.0f}",
        "ONNX file MB": lambda m: "-" if m["onnx"] is None else f"{m['onnx']['file_bytes'] / 1e6:.2f}",
        "ONNX (CPU) p50 / p95 ms": lambda m: latency(m["onnx"]),
        f"ONNX (CPU) images/s, batch {result['batch_size']}": lambda m: (
            "-" if m["onnx"] is None else f"{m['onnx']['throughput_images_per_s']:,.0f}"
        ),
        "test accuracy %": lambda m: "-" if m["test_acc"] is None else f"{m['test_acc']:.2f}",
    }
    models = result["models"]
    table = Table("", *models, title=f"{result['images']:,} images on {result['device']} ({result['precision']})")
    for label, cell in rows.items():
        table.add_row(label, *(cell(figures) for figures in models.values()))
    out.print(table)
    out.print(
        f"energy per 1,000 inferences: dfkd report {result['run']}", highlight=False, markup=False, soft_wrap=True
    )


def main() -> None:
    """The `dfkd` entry point: the typer app, with a mistyped command line reported as one `error:` line
    (exit 2) like every other user error, instead of a boxed usage message."""
    # typer raises its own copy of click's UsageError (the base of its BadParameter), whichever click it uses.
    usage_errors: tuple[type[Exception], ...] = tuple(
        cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError"
    )
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="dfkd", standalone_mode=False)
    except usage_errors as exc:
        message = str(getattr(exc, "format_message", lambda: "")())
        if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: no arguments, so the help, on stdout
            typer.echo(message)
        elif message:
            context = getattr(exc, "ctx", None)
            where = f" (see `{context.command_path} --help`)" if context is not None else ""
            err.print(Text.assemble(("error:", "red"), " ", message + where), highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Abort:
        err.print("aborted", highlight=False)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)
