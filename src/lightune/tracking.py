"""Experiment tracking (--report-to): a run logs to the trackers users already have, through accelerate's trackers
(`Accelerator(log_with=...)`): the resolved configuration as hyperparameters, each optimizer step's loss, learning
rate and gradient norm, every evaluation's metrics, the base and fine-tuned test metrics, and the run's plots.

Local stores by default: TensorBoard event files inside the run (`<run>/tensorboard/`), an MLflow SQLite store
beside the runs (`<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlruns/`) unless MLFLOW_TRACKING_URI says
otherwise, trackio's own local database. Step
values are logged at the evaluation points, where training reads its losses anyway: no host sync per step.
No heavy imports here (config validation reads TRACKERS).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ConfigError

# --report-to value -> (the module accelerate imports for it, what to pip install)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard (or: pip install 'lightune[tracking]')"),
    "mlflow": ("mlflow", "mlflow-skinny sqlalchemy alembic (or: pip install 'lightune[tracking]')"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}
PROJECT = "lightune"  # the MLflow experiment, the trackio project, TensorBoard's folder inside the run


def check_report_to(value) -> list[str] | None:
    """The trackers to log to (None for none); ConfigError for an unknown tracker or one that is not installed."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"report_to must be a list of tracker names; got {value!r}")
    names = [v.strip().lower() for v in value if v.strip()]
    if names in ([], ["none"]):
        return None
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"report_to: unknown tracker {unknown[0]!r}; choose none or from {', '.join(TRACKERS)}")
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to {name}: the {module} package is not installed; pip install {package}")
    return list(dict.fromkeys(names))


def hyperparameters(saved_config: dict) -> dict:
    """The run's configuration as the flat scalars trackers take: the settings given, and under resolved/ what
    they became (pooling, objective, learning rate, ...); lists and None as text."""
    flat = {k: v for k, v in saved_config.items() if k != "resolved"}
    flat.update({f"resolved/{k}": v for k, v in saved_config.get("resolved", {}).items()})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def scalars(prefix: str, metrics: dict) -> dict:
    """The number-valued metrics of one evaluation, named prefix/name."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunTracker:
    """The trackers of one run (none: every call does nothing), opened in the staged run directory."""

    def __init__(self, accelerator, report_to: list[str] | None):
        self.accelerator, self.on = accelerator, bool(report_to)
        self.pending: list[tuple[int, float, object]] = []  # (step, learning rate, gradient norm tensor or None)

    def start(self, work: Path, run_name: str, saved_config: dict, output_dir: str) -> None:
        """Open the run in every tracker, with its configuration as hyperparameters."""
        if not self.on:
            return
        self.accelerator.project_configuration.logging_dir = str(work / "tensorboard")
        init_kwargs = {"mlflow": {"run_name": run_name}, "trackio": {"name": run_name}}
        names = {str(t) for t in self.accelerator.log_with}  # accelerate's LoggerType values
        if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ:  # else mlflow's default: the working
            # directory; a SQLite store (MLflow 3 refuses new file stores) and its artifacts beside the runs
            import mlflow

            root = Path(output_dir).absolute()
            mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
            init_kwargs["mlflow"]["logging_dir"] = (root / "mlruns").as_uri()
        self.accelerator.init_trackers(PROJECT, config=hyperparameters(saved_config), init_kwargs=init_kwargs)

    def step(self, step: int, learning_rate: float, grad_norm) -> None:
        """Remember one optimizer step's learning rate and gradient norm (a device tensor: read later)."""
        if self.on:
            self.pending.append((step, learning_rate, grad_norm))

    def log_steps(self, losses: list[float]) -> None:
        """Log the remembered steps with their losses (read by training at this evaluation point), in one host
        sync for the gradient norms."""
        if not self.on or not self.pending:
            return
        import torch

        norms = [n for _, _, n in self.pending]
        values = torch.stack([torch.as_tensor(n, dtype=torch.float32).cpu() for n in norms]).tolist() \
            if all(n is not None for n in norms) else [None] * len(norms)
        for (step, lr, _), loss, norm in zip(self.pending, losses[-len(self.pending):], values):
            row = {"train/loss": loss, "train/learning_rate": lr}
            if norm is not None:
                row["train/grad_norm"] = norm
            self.accelerator.log(row, step=step)
        self.pending.clear()

    def log(self, prefix: str, metrics: dict, step: int) -> None:
        """Log one evaluation's metrics (validation, base, test) at a step."""
        if self.on:
            self.accelerator.log(scalars(prefix, metrics), step=step)

    def finish(self, work: Path, step: int) -> None:
        """The run's plots as artifacts where the tracker takes them (MLflow files, TensorBoard images); close."""
        if not self.on:
            return
        plots = sorted((work / "plots").glob("*.png"))
        for name in self.accelerator.log_with:
            tracker = self.accelerator.get_tracker(str(name), unwrap=False)
            if str(name) == "mlflow":
                for plot in plots:
                    tracker.log_artifact(str(plot), "plots")
            elif str(name) == "tensorboard" and plots:
                import matplotlib.image

                tracker.log_images({f"plots/{p.stem}": matplotlib.image.imread(p)[..., :3] for p in plots}, step=step,
                                   dataformats="HWC")
        self.accelerator.end_training()
