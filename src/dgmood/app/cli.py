"""The ``dgmood`` command: thin click wrappers over :mod:`dgmood.app.runs`."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from dgmood.data.images import DEFAULT_RESIZE, RESIZE_POLICIES

__all__ = ["main"]

DEFAULT_OOD = ("mnist:test", "uniform", "gaussian")
COMBINED_FEATURES = ("msma", "complexity", "flipd", "reconstruction", "fknn", "orient", "knn")  # = dgmood.methods.combined.FEATURES (tested)
FLOW_LR = 1e-3  # the Adam rate Glow and Neural Spline Flows trained their image flows with

# Idle OpenMP threads sleep instead of spinning: measured on 2 cores with one other busy process,
# training ran at 34 images/s with spinning threads and 208 with passive ones (no change when idle).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def _clean_errors(fn):
    """Turn the library's input errors into one-line messages and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dgmood.models.checkpoint import CheckpointError
        from dgmood.data.datasets import DataError

        try:
            return fn(*args, **kwargs)
        except (DataError, CheckpointError, ValueError, FileNotFoundError) as err:
            raise click.ClickException(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished checkpoints and caches are kept; rerun the same command to resume",
                       err=True)
            sys.exit(130)

    return wrapper


def _common(fn):
    """Options every run command shares."""
    options = [
        click.option("--run", "--run-dir", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Run directory (created by `train`, reused by every later command). Under torchrun write "
                          "--run-dir: torchrun takes --run as its own --run-path."),
        click.option("--device", default="cpu", show_default=True,
                     help="Torch device for network passes: cpu, cuda, cuda:N or auto."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder with the IDX files [default: $DGMOOD_DATA, else ~/.cache/dgmood/data]."),
        click.option("--threads", type=click.IntRange(1, 256), default=os.cpu_count() or 1, show_default=True,
                     help="CPU threads for torch."),
        click.option("--quiet", is_flag=True, help="Hide progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sigma_options(fn):
    """σ-grid options; unset means the run's grid (MSMA default: 10 levels, 1 → 0.01)."""
    options = [
        click.option("--n-sigmas", type=click.IntRange(1, 1000), default=None,
                     help="Number of σ levels L [default: the run's, 10 for a new run]."),
        click.option("--sigma-max", type=click.FloatRange(0, min_open=True), default=None,
                     help="Largest σ, [0, 1] pixel scale [default: the run's, 1.0 for a new run]."),
        click.option("--sigma-min", type=click.FloatRange(0, min_open=True), default=None,
                     help="Smallest σ [default: the run's, 0.01 for a new run]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _grid(features, n_sigmas=None, sigma_max=None, sigma_min=None):
    """``features`` (a FeatureConfig) with the σ-grid options that were given applied."""
    given = {"n_sigmas": n_sigmas, "sigma_max": sigma_max, "sigma_min": sigma_min}
    features = replace(features, **{k: v for k, v in given.items() if v is not None})
    if features.sigma_min > features.sigma_max:
        raise click.BadParameter(f"--sigma-min {features.sigma_min} exceeds --sigma-max {features.sigma_max}")
    return features


def _apply_grid(run, **grid) -> None:
    """Store a changed σ grid in the run's config (features are cached per grid; no retraining)."""
    config = run.config
    features = _grid(config.features, **grid)
    if features != config.features:
        run.save_config(replace(config, features=features))


def _open_run(run_dir, device, data_dir, threads, quiet, distributed=False):
    """The Run of a command. Under torchrun (only commands with ``distributed``: train, features) the
    process joins the job, and the machine's cores are shared among its processes."""
    from dgmood.utils import distributed as dist
    from dgmood.app.runs import Run, resolve_device

    if dist.launched():
        name = click.get_current_context().info_name
        if not distributed:
            raise click.ClickException(f"`dgmood {name}` does not run under torchrun (train and features do); "
                                       f"run it as a plain `dgmood {name}`")
        threads = min(threads, max(1, (os.cpu_count() or 1) // dist.local_world_size()))
    _threads(threads)
    device = resolve_device(device)
    return Run(run_dir, dist.init(device) if distributed else device, data_dir, progress=not quiet)


def _main_process() -> bool:
    """False on every torchrun process but rank 0 (which alone prints)."""
    from dgmood.utils import distributed as dist

    return dist.is_main()


def _end_torchrun_worker() -> None:
    """After a command's success under torchrun: exit once every process is done (no-op otherwise)."""
    from dgmood.utils import distributed as dist

    dist.end_worker()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="dgmood")
def main():
    """Unsupervised OOD detection with deep generative models.

    Typical use: `dgmood run --run runs/fmnist` trains a score model on FashionMNIST, computes
    multiscale score-norm features, fits the detectors and reports AUROC & co. against MNIST,
    uniform and gaussian noise. Each step also exists on its own: train, features, fit,
    evaluate, report.
    """


# ---------------------------------------------------------------- data
@main.group()
def data():
    """Datasets: download the named ones."""


@data.command("download")
@click.argument("name", type=click.Choice(["fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet",
                                           "celeba"]))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Target folder [default: $DGMOOD_DATA, else ~/.cache/dgmood/data].")
@_clean_errors
def data_download(name, data_dir):
    """Fetch the official files of NAME into the data folder: IDX files (fashion-mnist, mnist), CIFAR-10's and
    CIFAR-100's binary releases, SVHN's train/test .mat files, Tiny ImageNet's zip. CelebA has no plain URL: this
    says where to get its two files and where to put them."""
    from dgmood.data import datasets as datasets

    paths = datasets.download(name, datasets.resolve_data_dir(data_dir))
    for p in paths:
        click.echo(str(p))


# ---------------------------------------------------------------- stages
def _train_options(fn):
    from dgmood.models.network import NetConfig
    from dgmood.app.runs import FeatureConfig
    from dgmood.models.train import TrainConfig

    net, tr, feat = NetConfig(), TrainConfig(), FeatureConfig()
    options = [
        click.option("--data", "data_spec", default="fashion-mnist",
                     help="In-distribution training set: a name (fashion-mnist, mnist, cifar10, cifar100, svhn, "
                          "celeba), a slice like "
                          "mnist[:8000], a .npy/.npz/IDX file, a folder of images (read recursively) or a "
                          ".zip/.tar/.tar.gz archive of images."),
        click.option("--image-size", default=None, show_default=False, metavar="N|HxW",
                     help="The model's input size in pixels [default: the training set's most common size]."),
        click.option("--resize", type=click.Choice(RESIZE_POLICIES), default=DEFAULT_RESIZE,
                     help="How an image of another size is brought to the model's, everywhere (training, evaluate, "
                          "predict, serve): crop = scale the shorter side, cut the centre; stretch; pad = fit "
                          "inside, black bars; error = refuse it. Saved with the run and its detectors."),
        click.option("--in", "in_spec", default="", show_default=False,
                     help="In-distribution test set [default: NAME:test for a named training set]."),
        click.option("--model", type=click.Choice(["score", "flow"]), default="score",
                     help="Generative model: the noise-conditional score network (MSMA, diffusion lens) or the "
                          "multiscale spline image flow (flow lens of the dual-threshold method)."),
        click.option("--steps", type=click.IntRange(1), default=tr.steps, help="Training steps."),
        click.option("--batch-size", type=click.IntRange(1), default=tr.batch_size,
                     help="Images per step (under torchrun: in all, each process takes a slice)."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, show_default=False,
                     help=f"Peak learning rate [default: {tr.lr} for the score model, {FLOW_LR} for the flow]."),
        click.option("--channels", default=",".join(map(str, net.channels)),
                     help="UNet channels per resolution level, comma-separated."),
        click.option("--checkpoint-every", type=click.IntRange(1), default=tr.checkpoint_every,
                     help="Steps between checkpoints."),
        click.option("--seed", type=int, default=tr.seed, help="Seed of weights, data order and noise."),
        click.option("--amp/--no-amp", default=None,
                     help="Mixed precision (bfloat16 autocast) for the score network's training [default: on where "
                          "the device computes bf16 natively (CUDA GPUs, CPUs with AVX512-BF16 or AMX): ~1.4x faster "
                          "at the same AUROCs; off elsewhere; DGMOOD_KERNELS=amp=on|off sets it; see `dgmood info`]."),
        click.option("--perturb", type=click.FloatRange(0, 1), default=0.0,
                     help="Train a likelihood-ratio background model: each training pixel replaced by a random "
                          "8-bit level with this probability μ (Ren et al. 2019; 0.15 is their range's middle)."),
        click.option("--hflip/--no-hflip", default=None,
                     help="Mirror training images left-right at random, so a mirrored image scores as the original "
                          "[default: on for colour images (photographs are mirrored all the time), off for grey ones "
                          "(digits and letters are not)]."),
        click.option("--fit-n", type=click.IntRange(0), default=feat.fit_n,
                     help="Training images whose features fit the detectors (0 = all)."),
        click.option("--dry-run", is_flag=True, help="Print the resolved config and exit."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _image_size(text: str | None) -> tuple[int, int] | None:
    """(H, W) of ``--image-size`` (``32`` or ``32x48``), None when not given."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts) * (2 if len(parts) == 1 else 1)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise click.BadParameter(f"--image-size must be N or HxW in pixels, like 32 or 32x48; got {text!r}")
    return size


def _config_from_options(run, data_spec, in_spec, model, steps, batch_size, lr, channels, checkpoint_every, seed,
                         amp, perturb, fit_n, image_size=None, resize=DEFAULT_RESIZE, hflip=None, **grid):
    from dgmood.data import datasets as datasets
    from dgmood.models.flow import FlowConfig
    from dgmood.models.network import NetConfig
    from dgmood.app.runs import FeatureConfig, RunConfig
    from dgmood.models.train import TrainConfig

    try:
        chans = tuple(int(c) for c in channels.split(","))
    except ValueError as err:
        raise click.BadParameter(f"--channels must be integers like 32,64, got {channels!r}") from err
    shape = datasets.common_shape(data_spec, run.data_dir, _image_size(image_size))
    net = FlowConfig(image_shape=shape) if model == "flow" else NetConfig(image_shape=shape, channels=chans)
    lr = lr if lr is not None else FLOW_LR if model == "flow" else TrainConfig.lr
    if amp is None:
        from dgmood.models.train import default_amp

        amp = model != "flow" and default_amp(run.device)
    return RunConfig(
        data=data_spec, in_test=in_spec, net=net,
        train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed,
                          perturb=perturb, amp=amp, hflip=shape[0] == 3 if hflip is None else hflip),
        features=_grid(FeatureConfig(fit_n=fit_n), **grid), resize=resize,
    )


@main.command("train")
@_common
@_train_options
@_sigma_options
@_clean_errors
def train_cmd(run_dir, device, data_dir, threads, quiet, dry_run, **options):
    """Train (or resume) the generative model of a run: the score network, or the image flow (--model flow)."""
    run = _open_run(run_dir, device, data_dir, threads, quiet, distributed=True)
    config = _config_from_options(run, **options)
    if dry_run:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    run.create(config)
    start = time.perf_counter()
    run.train()
    if _main_process():
        click.echo(f"trained in {time.perf_counter() - start:.0f} s; checkpoint in {run.directory / 'checkpoint'}")
    _end_torchrun_worker()


@main.command("features")
@_common
@click.option("--data", "specs", multiple=True, required=True, help="Dataset spec(s) to featurise (repeatable).")
@_sigma_options
@_clean_errors
def features_cmd(run_dir, device, data_dir, threads, quiet, specs, **grid):
    """Compute and cache the multiscale score-norm features of datasets."""
    run = _open_run(run_dir, device, data_dir, threads, quiet, distributed=True)
    _apply_grid(run, **grid)
    for spec in specs:
        fs = run.features(spec)
        if _main_process():
            click.echo(f"{spec}: {fs.values.shape[0]} × {fs.values.shape[1]} features "
                       f"({fs.meta.get('images_per_s', float('nan')):.0f} images/s when computed)")
    _end_torchrun_worker()


@main.command("fit")
@_common
@click.option("--method", "methods", default=None, show_default=False,
              help="Method(s) to fit, comma-separated (combined, msma-knn, msma-gmm, msma-flow, pixel-knn, "
                   "dual-threshold) [default: the run's, combined for a score model].")
@click.option("--detectors", default=None, show_default=False,
              help="MSMA detectors to fit, comma-separated (gmm, flow, knn): the same as --method msma-NAME,...")
@click.option("--default", "make_default", is_flag=True,
              help="Make the (first) fitted method the run's default for predict, serve and dgmood.load.")
@_sigma_options
@_clean_errors
def fit_cmd(run_dir, device, data_dir, threads, quiet, methods, detectors, make_default, **grid):
    """Fit detectors on training images only (no OOD data is used) and save each as RUN/detectors/METHOD/."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    _apply_grid(run, **grid)
    names = []
    if detectors is not None:
        msma = _detector_names(detectors)
        run.save_config(replace(run.config, detectors=msma))
        names += [f"msma-{n}" for n in msma]
    if methods is not None or not names:
        names += _method_names(methods or run.config.method)
    if make_default:
        run.save_config(replace(run.config, method=names[0]))
    for name in names:
        det = run.image_detector(name, refit=True)
        click.echo(f"{name}: fitted on {det.info.get('n_fit')} training images; threshold {det.threshold:.4g}; "
                   f"saved in {run.detector_dir(name)}")


def _method_names(text: str) -> list[str]:
    from dgmood.methods.recipes import resolve_method

    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        return [resolve_method(n).name for n in names]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--method") from None


def _detector_names(text: str) -> tuple[str, ...]:
    from dgmood.detectors.estimators import DETECTORS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise click.BadParameter(f"unknown detector(s) {unknown}; choose from {', '.join(DETECTORS)}")
    return names


EVALUATE_METHODS = ["combined", "msma", "msma-knn", "msma-gmm", "msma-flow", "pixel-knn", "dual-threshold"]
DEFAULT_BASELINES = "msma-knn,pixel-knn"


@main.command("evaluate")
@_common
@click.option("--ood", "ood_specs", multiple=True, default=None, show_default=False,
              help="OOD set(s): a name, a slice, uniform/gaussian/constant, or a file/folder (repeatable) "
                   "[default: mnist:test, uniform, gaussian for a named training set, else uniform, gaussian, constant].")
@click.option("--in", "in_spec", default="", show_default=False, help="In-distribution test set [default: the run's].")
@click.option("--method", type=click.Choice(EVALUATE_METHODS), default=None, show_default=False,
              help="combined (the default for score models): one mixture on score norms, complexity, FLIPD LID, "
                   "reconstruction and raw-pixel k-NN distance (--features). msma: the three MSMA detectors on "
                   "multiscale score norms. msma-knn / msma-gmm / msma-flow / pixel-knn: one detector. "
                   "dual-threshold (the default for flow models): likelihood + LID (METHODS §3), through --lens.")
@click.option("--baselines", default=DEFAULT_BASELINES,
              help="Methods scored beside --method (combined, msma-*, pixel-knn), comma-separated; 'none' for none.")
@click.option("--features", "combined_features", default=",".join(COMBINED_FEATURES),
              help="combined: statistics to use, comma-separated (also available: field, pixels: the per-pixel "
                   "layout energies of the score field and of the raw pixels).")
@click.option("--lens", type=click.Choice(["flow", "diffusion"]), default=None, show_default=False,
              help="dual-threshold: the model seen as a density [default: flow for a flow run, diffusion for a score run].")
@click.option("--lid", type=click.Choice(["jacobian", "flipd", "normal-bundle"]), default=None, show_default=False,
              help="dual-threshold: LID estimator [default: jacobian for the flow lens, flipd for the diffusion lens].")
@click.option("--fit-n", "dual_fit_n", type=click.IntRange(2), default=500,
              help="dual-threshold: training images whose statistics fit the thresholds.")
@click.option("--solver", default="adaptive", metavar="SOLVER[:STEPS[:SPACING]]",
              help="dual-threshold, diffusion lens: PF-ODE solver of the likelihood: adaptive (Dormand-Prince), or "
                   "heun / euler with fixed steps (default 25) on a uniform or geometric time grid; heun:8:geometric "
                   "measured 10x faster than adaptive at the same AUROCs (docs/results.md).")
@click.option("--background", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="dual-threshold: a run of the same model kind trained with --perturb; adds the likelihood-ratio "
                   "baseline log p(x) − log p_background(x).")
@_sigma_options
@_clean_errors
def evaluate_cmd(run_dir, device, data_dir, threads, quiet, ood_specs, in_spec, method, baselines, combined_features,
                 lens, lid, dual_fit_n, solver, background, **grid):
    """Score the in-distribution test set and OOD sets; write metrics, plots and report."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    ood_specs = list(ood_specs or _default_ood(run))
    method = method or ("dual-threshold" if run.config.model == "flow" else "combined")
    if method == "dual-threshold":
        _evaluate_dual(run, ood_specs, in_spec, lens, lid, dual_fit_n, solver, background)
        return
    if run.config.model != "score":
        raise click.ClickException(f"{run.directory} holds a flow: the {method} method needs a score model; "
                                   "evaluate it with --method dual-threshold")
    _apply_grid(run, **grid)
    if method == "msma":
        _evaluate_and_report(run, ood_specs, in_spec)
        return
    _evaluate_methods(run, method, _baseline_names(baselines, method), ood_specs, in_spec, combined_features)


def _default_ood(run) -> tuple[str, ...]:
    """MNIST and noise beside a named training set; only the synthetic sets (made at the model's size) beside a
    custom one, whose images MNIST would not fit."""
    from dgmood.data.datasets import parse_spec

    return DEFAULT_OOD if parse_spec(run.config.data).kind == "named" else ("uniform", "gaussian", "constant")


def _baseline_names(text: str, method: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    names = [n for n in _method_names(text) if n != method]
    bad = [n for n in names if n == "dual-threshold"]
    if bad:
        raise click.BadParameter("dual-threshold is evaluated on its own (--method dual-threshold)",
                                 param_hint="--baselines")
    return names


def _evaluate_dual(run, ood_specs, in_spec, lens, lid, fit_n, solver, background=None):
    from dgmood.methods.dual_threshold import DualConfig, evaluate_dual, write_dual_outputs
    from dgmood.statistics.lens import LensConfig, parse_solver

    lens = lens or ("flow" if run.config.model == "flow" else "diffusion")
    lid = lid or ("jacobian" if lens == "flow" else "flipd")
    try:
        solver, steps, spacing = parse_solver(solver)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--solver") from None
    config = DualConfig(lens=LensConfig(lens=lens, lid=lid, solver=solver, steps=steps, spacing=spacing), fit_n=fit_n,
                        background=str(background or ""))
    start = time.perf_counter()
    evaluation = evaluate_dual(run, config, ood_specs, in_spec)
    in_spec = in_spec or run.config.in_test
    click.echo(write_dual_outputs(run, config, evaluation, in_spec, time.perf_counter() - start))
    click.echo(f"\nreport: {evaluation.directory / 'report.md'}")


def _evaluate_methods(run, method, baselines, ood_specs, in_spec, features):
    """The one evaluation of the image-detector methods: fit (or load) each, score, write RUN/METHOD/."""
    from dgmood.evaluation.evaluate import write_evaluation
    from dgmood.methods.combined import evaluate_combined, write_combined_outputs
    from dgmood.methods.explain import galleries
    from dgmood.utils.files import write_json

    names = tuple(n.strip() for n in features.split(",") if n.strip())
    try:
        config = run.method_config(features=names)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--features") from None
    start = time.perf_counter()
    in_spec = in_spec or run.config.in_test
    if method == "combined":
        ev = evaluate_combined(run, config, ood_specs, in_spec, baselines=tuple(baselines))
        table, directory = write_combined_outputs(run, config, ev, in_spec, time.perf_counter() - start), ev.directory
    else:
        ev, detectors = run.evaluate_methods([method, *baselines], ood_specs, in_spec)
        directory = run.directory / method
        context = {"training set": run.config.data, "in-distribution test set": in_spec,
                   "model sha256": run.model_sha[:16], "threshold": f"{detectors[method].threshold:.4g}",
                   "saved detector": str(run.detector_dir(method)),
                   "evaluation time": f"{time.perf_counter() - start:.1f} s"}
        table = write_evaluation(directory, ev, context, f"dgmood {method} report", method,
                                 galleries=galleries(detectors[method], ev, method))
    write_json(run.directory / "last_evaluation.json", {"method": method, "baselines": baselines, "in": in_spec,
                                                        "ood": list(ood_specs), "features": list(names)})
    click.echo(table)
    click.echo(f"\nreport: {directory / 'report.md'} (with images: {directory / 'report.html'})")


def _evaluate_and_report(run, ood_specs, in_spec=""):
    start = time.perf_counter()
    ev, features, detectors = run.evaluate(ood_specs, in_spec)
    table = run.write_outputs(ev, features, detectors, seconds=time.perf_counter() - start)
    click.echo(table)
    click.echo(f"\nreport: {run.directory / 'report.md'}")


@main.command("report")
@_common
@_clean_errors
def report_cmd(run_dir, device, data_dir, threads, quiet):
    """Rewrite metrics, plots and report from cached features (no network pass)."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    path, msma = run.directory / "last_evaluation.json", run.directory / "evaluation.json"
    if path.is_file():
        last = json.loads(path.read_text())
        _evaluate_methods(run, last["method"], last["baselines"], last["ood"], last["in"],
                          ",".join(last.get("features") or COMBINED_FEATURES))
    elif msma.is_file():
        last = json.loads(msma.read_text())
        _evaluate_and_report(run, last["ood"], last["in"])
    else:
        raise click.ClickException(f"nothing evaluated in {run.directory} yet; run `dgmood evaluate` first")


@main.command("run")
@_common
@_train_options
@_sigma_options
@click.option("--ood", "ood_specs", multiple=True, default=None, show_default=False,
              help="OOD set(s) to evaluate against (repeatable) [default: as `dgmood evaluate`].")
@click.option("--method", type=click.Choice(["combined", "msma", "msma-knn", "msma-gmm", "msma-flow", "pixel-knn"]),
              default="combined", help="Detection method of a score model (a flow gets the dual threshold).")
@click.option("--baselines", default=DEFAULT_BASELINES, help="Methods scored beside it; 'none' for none.")
@click.option("--detectors", default="knn,gmm,flow", help="MSMA detectors of --method msma, comma-separated.")
@_clean_errors
def run_cmd(run_dir, device, data_dir, threads, quiet, dry_run, ood_specs, method, baselines, detectors, **options):
    """Train, fit and evaluate in one go (each stage resumes from what is cached). A score model gets the
    combined detector with the MSMA k-NN and the raw-pixel 5-NN beside it; a flow (--model flow) the dual
    threshold."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    config = replace(_config_from_options(run, **options), detectors=_detector_names(detectors),
                     method="dual-threshold" if options["model"] == "flow" else
                     ("msma-knn" if method == "msma" else method))
    if dry_run:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    run.create(config)
    run.train()
    ood_specs = list(ood_specs or _default_ood(run))
    if config.model == "flow":
        from dgmood.methods.dual_threshold import DualConfig
        from dgmood.statistics.lens import LensConfig

        _evaluate_dual(run, ood_specs, options["in_spec"], "flow", "jacobian", DualConfig.fit_n, LensConfig.solver)
    elif method == "msma":
        _evaluate_and_report(run, ood_specs, options["in_spec"])
    else:
        _evaluate_methods(run, method, _baseline_names(baselines, method), ood_specs, options["in_spec"],
                          ",".join(COMBINED_FEATURES))


# ---------------------------------------------------------------- new images
@main.command("predict")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Fitted run directory, or a saved detector folder (RUN/detectors/METHOD).")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("verdicts.csv"),
              help="CSV of verdicts, one row per image (written whole, or not at all).")
@click.option("--method", default=None, show_default=False,
              help="Fitted method to use (combined, msma-knn, pixel-knn, ...) [default: the run's].")
@click.option("--maps", "maps_dir", type=click.Path(path_type=Path), default=None,
              help="Also write DIR/maps.npy (N x H x W anomaly maps, higher = more anomalous) and one PNG per "
                   "image: image, map overlay, nearest training image, score, verdict, reasons.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with the IDX files of named sets [default: $DGMOOD_DATA, else ~/.cache/dgmood/data].")
@click.option("--device", default="cpu", help="Torch device for network passes: cpu, cuda, cuda:N or auto.")
@click.option("--threads", type=click.IntRange(1, 256), default=os.cpu_count() or 1, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="Hide progress bars.")
@click.option("--skip-bad", is_flag=True,
              help="Score the other images when a file is corrupt, truncated, empty, too large or not an image, and "
                   "list each skipped file with its reason (in the CSV's error column and here) [default: stop at "
                   "the first, writing nothing].")
@_clean_errors
def predict_cmd(run_dir, images, out, method, maps_dir, data_dir, device, threads, quiet, skip_bad):
    """Which of IMAGES are out of distribution: score them with a fitted detector and write a CSV of verdicts.

    IMAGES are dataset specs: folders of images (read recursively), .zip/.tar/.tar.gz archives of images,
    .npy/.npz arrays, IDX files, named sets, slices (e.g. `scans/`, `photos.zip[:500]`, `x.npz:test`,
    `mnist:test[:100]`). Images of any size and mode are brought to the model by the detector's resize
    policy; sets are streamed in chunks, so any number of images fits in memory. The CSV has one row per
    image: source (the path in its folder or archive, or SPEC#INDEX), set, index, height and width of the
    original, score, verdict (+1 in-distribution / -1 OOD), threshold, reasons (the statistics furthest
    from training, e.g. "complexity -4.1σ"), each statistic's raw values, each column's deviation from
    training (z:COLUMN) and error (why a file was skipped, with --skip-bad).
    """
    from dgmood.app.loading import load
    from dgmood.app.predict import predict

    _threads(threads)
    if (run_dir / "config.json").is_file():  # a run: its detector, fitted first when missing or stale
        run = _open_run(run_dir, device, data_dir, threads, quiet)
        if not (run.detector_dir(method or run.config.method) / "detector.json").is_file():
            click.echo(f"fitting {method or run.config.method} on {run.config.data} first (saved for next time)",
                       err=True)
        detector = run.image_detector(method)
    else:
        detector = load(run_dir, method, device)
    detector.progress = not quiet
    summary = predict(detector, list(images), out, data_dir, maps_dir, skip_bad=skip_bad)
    n, flagged = summary.n, summary.flagged
    for spec, counts in summary.ignored.items():
        click.echo(f"{spec}: ignored {', '.join(f'{n} {why}' for why, n in counts.items())} "
                   f"file{'s' if sum(counts.values()) > 1 else ''}", err=True)
    for source, reason in summary.skipped:
        click.echo(f"skipped {source}: {reason}", err=True)
    click.echo(f"{flagged} of {n} images flagged out-of-distribution ({100 * flagged / max(n, 1):.1f} %) "
               f"by {detector.method} (threshold {detector.threshold:.4g}); verdicts in {out}"
               + (f"; maps in {maps_dir}" if maps_dir else "")
               + (f"; {len(summary.skipped)} files skipped (listed above and in the CSV)" if summary.skipped else ""))


# ---------------------------------------------------------------- online scoring
@main.command("serve")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Fitted run directory, or a saved detector folder (RUN/detectors/METHOD, copied anywhere).")
@click.option("--method", "--detector", "detector", default=None, show_default=False,
              help="Fitted method to serve (combined, msma-knn, ...; older names knn, gmm, flow) [default: the run's].")
@click.option("--host", default="127.0.0.1", help="Address to listen on (no authentication or TLS: keep loopback).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, help="TCP port; 0 picks a free one (printed).")
@click.option("--max-bytes", type=click.IntRange(1), default=2_000_000,
              help="Largest upload accepted; bigger ones get 413 from their Content-Length.")
@click.option("--threads", type=click.IntRange(1, 256), default=1,
              help="CPU threads of torch's network pass (one batched pass at a time).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Most images of concurrent requests scored together in one network pass.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 1000), default=5.0, show_default=True,
              help="Longest wait, in milliseconds, for more requests to join a batch (only while some are arriving).")
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Most requests admitted at once (at most this many bodies in memory); more get 503.")
@click.option("--device", default="cpu", help="Torch device for network passes: cpu, cuda, cuda:N or auto.")
@click.option("--quiet", is_flag=True, help="No access log on stderr.")
@_clean_errors
def serve_cmd(run_dir, detector, host, port, max_bytes, threads, batch_size, batch_wait_ms, max_queue, device,
              quiet):
    """Serve a fitted detector over HTTP (an ASGI app under uvicorn): POST /score, GET / (a page to drop images
    on), GET /docs (OpenAPI), GET /info and GET /health.

    POST one image as the raw body (curl --data-binary @img.png URL/score) or as the form field
    `file` (curl -F file=@img.png URL/score); the answer is JSON {"score", "in_distribution",
    "reasons", "threshold", "detector", "model_sha256"}. A batch (an .npy of N images, or several -F file=@...
    parts) gets {"scores": [...], "in_distribution": [...], "n", ...}. Bad uploads get a 4xx JSON
    {"error"}. Ctrl-C or SIGTERM stops it after the requests in flight.
    """
    from dgmood.app.serve import serve

    _threads(threads)
    try:
        serve(run_dir, detector, host, port, max_bytes, device, log=not quiet, echo=click.echo,
              batch_size=batch_size, batch_wait_ms=batch_wait_ms, max_queue=max_queue)
    except OSError as err:  # cannot listen (address in use, ...) or read the run
        raise click.ClickException(err.strerror or str(err)) from err
    # Clean stop done (requests finished, "stopped" printed). Skip interpreter teardown: torch's C++
    # thread pools sometimes abort there ("terminate called without an active exception", seen in
    # 2 of 7 SIGINT stops), which would turn a clean stop into exit status -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- this machine
@main.command("info")
@_clean_errors
def info_cmd():
    """Versions, the CPU's relevant flags and the kernels chosen for it (k-NN search, train's --amp default,
    ONNX Runtime or torch, threads), each with where the choice came from: probe, cached, override or feature
    rule. Runs the k-NN probe (a few ms; under 0.3 s on CPUs without VNNI) if nothing is cached."""
    import platform

    import torch

    from dgmood import __version__
    from dgmood.utils import kernels

    click.echo(f"dgmood {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
               f"{platform.system()}")
    for line in kernels.describe():
        click.echo(line)


if __name__ == "__main__":
    main()
