"""A fine-tune cell's hyper-parameter search: a Ray Tune experiment over the project's trainer.

Each trial is a Tune function trainable that runs the family's own Ray Train job (the same
`run(job)` a plain fine-tune cell runs) with the trial's hparams over the recipe's, in the trial's
folder, and a held-out validation split; Ray Train's TuneReportCallback forwards the worker's
per-epoch report (val_loss, val_accuracy, epoch) to Tune, so ASHA can stop trials at its rungs.
(Ray Train V2 runs a trainer inside a Tune function trainable rather than handing Tune the
trainer itself.)

    <cell>/search/                 Tune's experiment: its state, each trial's reported results
    <cell>/trials/<trial id>/      each trial's Ray Train job: its checkpoints, and its model/ and
                                   trial.json when it ran to its last epoch
    <cell>/model/                  the best finished trial's model: what the inference cells load

A rerun after a kill restores the experiment (`Tuner.restore`): finished trials are not run
again, and an unfinished one goes on from its own last Ray Train checkpoint. Ray Tune does not
save a scheduler's state with the experiment, so after a restore ASHA's rungs start empty: the
trials still to run are compared with each other, not with those finished before the kill.

The best trial is the best, by the search's metric at its last report, among the trials that ran
to their last epoch: a trial ASHA stopped has no model of its recipe (it was cut short), and by
ASHA's rule it trailed its rung.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from grid.errors import GridError
from grid.jobs import FinetuneJob
from grid.search import Choice, Dimension, LogUniform, RandInt, SearchSpec, Uniform

EXPERIMENT = "search"  # Tune's experiment: its state and each trial's results
TRIALS = "trials"  # each trial's Ray Train job: checkpoints, model, metrics
TRIAL_FILE = "trial.json"  # a finished trial's metrics, hparams and validation split


def tune_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """The spec's dimensions as Ray Tune's sampling domains."""
    from ray import tune

    def domain(d: Dimension) -> Any:
        if isinstance(d, LogUniform):
            return tune.loguniform(*d.loguniform)
        if isinstance(d, Uniform):
            return tune.uniform(*d.uniform)
        if isinstance(d, RandInt):
            return tune.randint(d.randint[0], d.randint[1] + 1)  # Tune's upper bound is excluded
        assert isinstance(d, Choice)
        return tune.choice(list(d.choice))

    return {name: domain(d) for name, d in space.items()}


def trial(config: dict[str, Any], job: dict[str, Any]) -> None:
    """One trial: the family's Ray Train job with this point's hparams, in the trial's folder."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = FinetuneJob.model_validate(job)
    # The cell's own folder, not Tune's trial dir (a staging folder of the Ray session, which a
    # restarted Ray does not have): the trial's Ray Train job resumes from its checkpoints there.
    folder = Path(base.output_dir) / TRIALS / tune.get_context().get_trial_id()
    trial_job = base.model_copy(update={"hparams": {**base.hparams, **plain(config)}, "output_dir": str(folder)})
    metrics = _trainer(base.family)(trial_job, callbacks=(TuneReportCallback(),))
    (Path(trial_job.output_dir) / TRIAL_FILE).write_text(json.dumps(metrics, indent=1))


def plain(config: dict[str, Any]) -> dict[str, Any]:
    """A drawn point with Python numbers (Tune draws numpy ones, which JSON does not write)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in config.items()}


def _trainer(family: str):
    if family != "encoder":
        raise GridError(f"a search runs encoder fine-tunes only so far, not {family}")
    from workers.train_encoder import run

    return run


def run_search(job: FinetuneJob, spec: SearchSpec) -> dict[str, Any]:
    """Run (or resume) the search of a fine-tune cell whose folder is `job.output_dir`; copy the best
    finished trial's model to `output_dir/model`; return that trial's train metrics with the search's
    record (`search`: the chosen values, every trial's config, status and curve)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    if not ray.is_initialized():
        ray.init()
    out = Path(job.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    job = job.model_copy(update={"output_dir": str(out), "validation": spec.validation})
    # A trial's driver only waits on its Ray Train job: it holds no CPU (so the job's workers fit on
    # a 2-CPU machine), and a byte of memory, since Tune refuses a trial that asks for nothing.
    trainable = tune.with_resources(tune.with_parameters(trial, job=job.model_dump()), {"cpu": 0, "memory": 1})
    path = out / EXPERIMENT
    if tune.Tuner.can_restore(path):
        print(f"search: resuming the experiment in {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        asha = spec.scheduler.asha
        scheduler = None if asha is None else ASHAScheduler(
            # max_t past the longest trial: ASHA stops a trial that reaches max_t, which would cut a
            # trial off between its last report and saving its model; trials end by themselves.
            time_attr="epoch", max_t=_longest_epochs(job, spec) + 1, grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=tune_space(spec.space),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.trials, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.concurrent)),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1)))
    grid = tuner.fit()
    trials = [_trial_record(r, out / TRIALS) for r in grid]
    finished = [t for t in trials if t["status"] == "finished"]
    if not finished:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error]
        raise GridError(f"search: no trial ran to its last epoch ({len(trials)} trials"
                        + (f"; first error: {errors[0]}" if errors else "") + ")")
    best = (max if spec.mode == "max" else min)(finished, key=lambda t: t["last"][spec.metric])
    trial_dir = out / TRIALS / best["trial_id"]
    model = out / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(trial_dir / "model", model)
    metrics = json.loads((trial_dir / TRIAL_FILE).read_text())
    record = {"chosen": best["config"], "best_trial": best["trial_id"], "metric": spec.metric,
              "mode": spec.mode, "best_value": best["last"][spec.metric], "trials": trials,
              "stopped_early": sum(t["status"] == "stopped" for t in trials)}
    print(f"search: best trial {best['trial_id']} {best['config']} {spec.metric} "
          f"{best['last'][spec.metric]:.4f}; {record['stopped_early']} of {len(trials)} stopped early", flush=True)
    return metrics | {"model_dir": str(model), "search": record}


def _longest_epochs(job: FinetuneJob, spec: SearchSpec) -> int:
    from grid.tasks import get_task
    from workers.training import resolve_hparams

    return spec.longest_trial_epochs(resolve_hparams(job, get_task(job.task).encoder_epochs), 1)


def _trial_record(result: Any, trials_dir: Path) -> dict[str, Any]:
    """One trial: its point, its curve (one row per report), finished / stopped / failed."""
    frame = result.metrics_dataframe
    keep = [c for c in ("epoch", "step", "loss", "val_loss", "val_accuracy") if frame is not None and c in frame]
    curve = [] if frame is None else [{k: float(v) for k, v in row.items()} for row in frame[keep].to_dict("records")]
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    trial_dir = trials_dir / trial_id
    status = "failed" if result.error else "finished" if (trial_dir / TRIAL_FILE).is_file() else "stopped"
    return {"trial_id": trial_id, "config": plain(result.config),
            "status": status, "epochs_run": curve[-1]["epoch"] if curve else 0,
            "last": {k: v for k, v in (curve[-1] if curve else {}).items() if k.startswith("val_")},
            "curve": curve}

