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

__all__ = ["main"]

DEFAULT_OOD = ("mnist:test", "uniform", "gaussian")
COMBINED_FEATURES = ("msma", "complexity", "flipd", "reconstruction", "knn")  # = dgmood.methods.combined.FEATURES (tested)
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
@click.argument("name", type=click.Choice(["fashion-mnist", "mnist"]))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Target folder [default: $DGMOOD_DATA, else ~/.cache/dgmood/data].")
@_clean_errors
def data_download(name, data_dir):
    """Fetch the official IDX files of NAME into the data folder."""
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
                     help="In-distribution training set: a name (fashion-mnist, mnist), a slice like "
                          "mnist[:8000], or a .npy/.npz/IDX file or image folder."),
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
        click.option("--amp", is_flag=True,
                     help="Mixed precision (bfloat16 autocast) for the score network's training; meant for GPUs."),
        click.option("--perturb", type=click.FloatRange(0, 1), default=0.0,
                     help="Train a likelihood-ratio background model: each training pixel replaced by a random "
                          "8-bit level with this probability μ (Ren et al. 2019; 0.15 is their range's middle)."),
        click.option("--fit-n", type=click.IntRange(0), default=feat.fit_n,
                     help="Training images whose features fit the detectors (0 = all)."),
        click.option("--dry-run", is_flag=True, help="Print the resolved config and exit."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config_from_options(run, data_spec, in_spec, model, steps, batch_size, lr, channels, checkpoint_every, seed,
                         amp, perturb, fit_n, **grid):
    from dgmood.data import datasets as datasets
    from dgmood.models.flow import FlowConfig
    from dgmood.models.network import NetConfig
    from dgmood.app.runs import FeatureConfig, RunConfig
    from dgmood.models.train import TrainConfig

    try:
        chans = tuple(int(c) for c in channels.split(","))
    except ValueError as err:
        raise click.BadParameter(f"--channels must be integers like 48,96,96, got {channels!r}") from err
    images = datasets.load_images(data_spec, run.data_dir)
    shape = tuple(images.shape[1:])
    net = FlowConfig(image_shape=shape) if model == "flow" else NetConfig(image_shape=shape, channels=chans)
    lr = lr if lr is not None else FLOW_LR if model == "flow" else TrainConfig.lr
    return RunConfig(
        data=data_spec, in_test=in_spec, net=net,
        train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed,
                          perturb=perturb, amp=amp),
        features=_grid(FeatureConfig(fit_n=fit_n), **grid),
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
@click.option("--detectors", default="knn,gmm,flow", help="Detectors to fit, comma-separated (gmm, flow, knn).")
@_sigma_options
@_clean_errors
def fit_cmd(run_dir, device, data_dir, threads, quiet, detectors, **grid):
    """Fit detectors on the training set's features (no OOD data is used)."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    _apply_grid(run, **grid)
    names = _detector_names(detectors)
    run.save_config(replace(run.config, detectors=names))
    for name, det in run.fit_detectors().items():
        click.echo(f"{name}: fitted; threshold (offset_) {det.offset_:.4g}")


def _detector_names(text: str) -> tuple[str, ...]:
    from dgmood.detectors.estimators import DETECTORS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in DETECTORS]
    if unknown or not names:
        raise click.BadParameter(f"unknown detector(s) {unknown}; choose from {', '.join(DETECTORS)}")
    return names


@main.command("evaluate")
@_common
@click.option("--ood", "ood_specs", multiple=True, default=DEFAULT_OOD,
              help="OOD set(s): a name, a slice, uniform/gaussian/constant, or a file/folder (repeatable).")
@click.option("--in", "in_spec", default="", show_default=False, help="In-distribution test set [default: the run's].")
@click.option("--method", type=click.Choice(["msma", "dual-threshold", "combined"]), default="msma",
              help="msma: detectors on multiscale score norms (score runs). dual-threshold: likelihood + LID "
                   "(METHODS §3), through --lens. combined: one mixture on score norms, complexity, FLIPD LID, "
                   "reconstruction and raw-pixel k-NN distance (score runs; --features).")
@click.option("--features", "combined_features", default=",".join(COMBINED_FEATURES),
              help="combined: statistics to use, comma-separated.")
@click.option("--lens", type=click.Choice(["flow", "diffusion"]), default=None, show_default=False,
              help="dual-threshold: the model seen as a density [default: flow for a flow run, diffusion for a score run].")
@click.option("--lid", type=click.Choice(["jacobian", "flipd", "normal-bundle"]), default=None, show_default=False,
              help="dual-threshold: LID estimator [default: jacobian for the flow lens, flipd for the diffusion lens].")
@click.option("--fit-n", "dual_fit_n", type=click.IntRange(2), default=500,
              help="dual-threshold: training images whose statistics fit the thresholds.")
@click.option("--solver", type=click.Choice(["adaptive", "euler"]), default="adaptive",
              help="dual-threshold, diffusion lens: PF-ODE solver of the likelihood.")
@click.option("--background", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="dual-threshold: a run of the same model kind trained with --perturb; adds the likelihood-ratio "
                   "baseline log p(x) − log p_background(x).")
@_sigma_options
@_clean_errors
def evaluate_cmd(run_dir, device, data_dir, threads, quiet, ood_specs, in_spec, method, combined_features, lens, lid,
                 dual_fit_n, solver, background, **grid):
    """Score the in-distribution test set and OOD sets; write metrics, plots and report."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    if method == "dual-threshold":
        _evaluate_dual(run, list(ood_specs), in_spec, lens, lid, dual_fit_n, solver, background)
        return
    if method == "combined":
        _evaluate_combined(run, list(ood_specs), in_spec, combined_features)
        return
    if run.config.model != "score":
        raise click.ClickException(f"{run.directory} holds a flow: evaluate it with --method dual-threshold")
    _apply_grid(run, **grid)
    _evaluate_and_report(run, list(ood_specs), in_spec)


def _evaluate_dual(run, ood_specs, in_spec, lens, lid, fit_n, solver, background=None):
    from dgmood.methods.dual_threshold import DualConfig, evaluate_dual, write_dual_outputs
    from dgmood.statistics.lens import LensConfig

    lens = lens or ("flow" if run.config.model == "flow" else "diffusion")
    lid = lid or ("jacobian" if lens == "flow" else "flipd")
    config = DualConfig(lens=LensConfig(lens=lens, lid=lid, solver=solver), fit_n=fit_n,
                        background=str(background or ""))
    start = time.perf_counter()
    evaluation = evaluate_dual(run, config, ood_specs, in_spec)
    in_spec = in_spec or run.config.in_test
    click.echo(write_dual_outputs(run, config, evaluation, in_spec, time.perf_counter() - start))
    click.echo(f"\nreport: {evaluation.directory / 'report.md'}")


def _evaluate_combined(run, ood_specs, in_spec, features):
    from dgmood.methods.combined import CombinedConfig, evaluate_combined, write_combined_outputs

    if run.config.model != "score":
        raise click.ClickException(f"{run.directory} holds a flow: the combined detector needs a score model")
    names = tuple(n.strip() for n in features.split(",") if n.strip())
    try:
        config = CombinedConfig(features=names)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--features") from None
    start = time.perf_counter()
    evaluation = evaluate_combined(run, config, ood_specs, in_spec)
    in_spec = in_spec or run.config.in_test
    click.echo(write_combined_outputs(run, config, evaluation, in_spec, time.perf_counter() - start))
    click.echo(f"\nreport: {evaluation.directory / 'report.md'}")


def _evaluate_and_report(run, ood_specs, in_spec=""):
    start = time.perf_counter()
    results, scores, features = run.evaluate(ood_specs, in_spec)
    table = run.write_outputs(results, scores, features, seconds=time.perf_counter() - start)
    click.echo(table)
    click.echo(f"\nreport: {run.directory / 'report.md'}")


@main.command("report")
@_common
@_clean_errors
def report_cmd(run_dir, device, data_dir, threads, quiet):
    """Rewrite metrics, plots and report from cached features (no network pass)."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    path = run.directory / "evaluation.json"
    if not path.is_file():
        raise click.ClickException(f"nothing evaluated in {run.directory} yet; run `dgmood evaluate` first")
    last = json.loads(path.read_text())
    _evaluate_and_report(run, last["ood"], last["in"])


@main.command("run")
@_common
@_train_options
@_sigma_options
@click.option("--ood", "ood_specs", multiple=True, default=DEFAULT_OOD,
              help="OOD set(s) to evaluate against (repeatable).")
@click.option("--detectors", default="knn,gmm,flow", help="Detectors to fit, comma-separated.")
@_clean_errors
def run_cmd(run_dir, device, data_dir, threads, quiet, dry_run, ood_specs, detectors, **options):
    """Train, featurise, fit and evaluate in one go (each stage resumes from what is cached). A flow
    (--model flow) is evaluated by the dual threshold with its defaults."""
    run = _open_run(run_dir, device, data_dir, threads, quiet)
    config = replace(_config_from_options(run, **options), detectors=_detector_names(detectors))
    if dry_run:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    run.create(config)
    run.train()
    if config.model == "flow":
        from dgmood.methods.dual_threshold import DualConfig
        from dgmood.statistics.lens import LensConfig

        _evaluate_dual(run, list(ood_specs), options["in_spec"], "flow", "jacobian", DualConfig.fit_n,
                       LensConfig.solver)
    else:
        _evaluate_and_report(run, list(ood_specs), options["in_spec"])


# ---------------------------------------------------------------- online scoring
@main.command("serve")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Fitted run directory (or a copy of its config.json, checkpoint/ and detectors/NAME/).")
@click.option("--detector", default=None, show_default=False,
              help="Fitted detector to serve [default: the first in the run's config].")
@click.option("--host", default="127.0.0.1", help="Address to listen on (no authentication or TLS: keep loopback).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, help="TCP port; 0 picks a free one (printed).")
@click.option("--max-bytes", type=click.IntRange(1), default=2_000_000,
              help="Largest upload accepted; bigger ones get 413 from their Content-Length.")
@click.option("--threads", type=click.IntRange(1, 256), default=1,
              help="CPU threads of torch's network pass (passes run one at a time; HTTP uses a thread per connection).")
@click.option("--device", default="cpu", help="Torch device for network passes: cpu, cuda, cuda:N or auto.")
@click.option("--quiet", is_flag=True, help="No access log on stderr.")
@_clean_errors
def serve_cmd(run_dir, detector, host, port, max_bytes, threads, device, quiet):
    """Serve a fitted detector over HTTP: POST /score (one PNG/JPEG/.npy image) and GET /health.

    POST the image as the raw body (curl --data-binary @img.png URL/score) or as the form field
    `file` (curl -F file=@img.png URL/score); the answer is JSON {"score", "in_distribution",
    "threshold", "detector", "model_sha256"}. Bad uploads get a 4xx JSON {"error"}. Ctrl-C or
    SIGTERM stops it after the requests in flight.
    """
    from dgmood.app.serve import serve

    _threads(threads)
    try:
        serve(run_dir, detector, host, port, max_bytes, device, log=not quiet, echo=click.echo)
    except OSError as err:  # cannot listen (address in use, ...) or read the run
        raise click.ClickException(err.strerror or str(err)) from err
    # Clean stop done (requests finished, "stopped" printed). Skip interpreter teardown: torch's C++
    # thread pools sometimes abort there ("terminate called without an active exception", seen in
    # 2 of 7 SIGINT stops), which would turn a clean stop into exit status -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
