"""fmnist_lab's Optuna sweeper: hydra-optuna-sweeper, with a search that can be continued and that ends in the
sweep summary (and a non-zero exit) instead of a traceback.

- A failed job records its error in its metrics.json and returns no objective (one failure must not end a
  grid sweep), which hydra-optuna-sweeper marks as a FAIL trial, so `max_failure_rate` applies. When
  failures stop the search, or no trial finished, the plugin raises a ValueError; this sweeper logs why.
- Run again with the same `hydra.sweep.dir`, a search continues its study (`<sweep dir>/optuna.db`):
  `n_trials` is the study's total, trials a killed search left RUNNING are closed (COMPLETE with the value
  their job recorded, else FAIL), and the sampler is reseeded, so new trials do not repeat the first ones.

Hydra only loads sweepers from `hydra_plugins`, hence this package. Used by conf/hparams_search/optuna.yaml.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginSweeper
except ImportError:  # the `sweep` extra is not installed: nothing to offer
    PluginSweeper = None

log = logging.getLogger(__name__)


def existing_trials(study_name: str, storage: str | None) -> list:
    """The trials of the study already in `storage` ([] for a new search)."""
    import optuna

    if storage is None or (storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file()):
        return []
    try:
        return optuna.load_study(study_name=study_name, storage=storage).trials
    except KeyError:  # optuna's answer for a study that does not exist yet
        return []


def recorded_value(params: dict[str, Any], sweep_dir: Path, metric: str) -> float | None:
    """The objective that a finished job with exactly these parameters recorded in the sweep folder."""
    from fmnist_lab.run_dir import BadFileError, RunDir

    for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
        given = dict(o.split("=", 1) for o in job_overrides(overrides) if "=" in o)
        if all(given.get(name) == str(value) for name, value in params.items()):
            try:
                value = RunDir(overrides.parent.parent).finished().get(metric)
            except BadFileError:
                continue
            if value is not None and math.isfinite(value):
                return value
    return None


def job_overrides(path: Path) -> list[str]:
    """A job's .hydra/overrides.yaml, read as a file that may come from elsewhere (fmnist_lab.untrusted: plain data,
    no aliases, no FIFO, size-capped); SystemExit with one paragraph naming it when it is damaged."""
    from fmnist_lab.untrusted import BadFileError, load_yaml

    try:
        overrides = load_yaml(path)
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise BadFileError(f"{path} is damaged: it holds no list of overrides.")
    except (BadFileError, OSError) as err:
        what = err if isinstance(err, BadFileError) else f"{path} cannot be read ({err.strerror})."
        job = path.parent.parent
        raise SystemExit(f"error: {what} The search reads it to find the result of a trial that an earlier, stopped "
                         "search left running, so it cannot continue. Restore the file, or move its job folder "
                         f"{job} out of {job.parent}, then run the search again.") from None
    return overrides


if PluginSweeper is not None:

    class OptunaSweeper(PluginSweeper):
        def __init__(self, **kwargs: Any) -> None:
            self.study_name, self.storage = kwargs["study_name"], kwargs["storage"]
            self.max_failure_rate = kwargs["max_failure_rate"]
            earlier = len(existing_trials(self.study_name, self.storage))
            if earlier:  # a continued search: n_trials in all, and a sampler that does not start over
                kwargs["n_trials"] = max(0, kwargs["n_trials"] - earlier)
                # Hydra hands over the sampler built with `seed`, which would propose the first trials again
                kwargs["sampler"].reseed_rng()
                log.info(f"continuing the study {self.study_name} ({earlier} trials so far): "
                         f"{kwargs['n_trials']} more")
            super().__init__(**kwargs)

        def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            self.close_stale_trials(Path(config.hydra.sweep.dir), config.get("optimized_metric", "val/acc_best"))

        def close_stale_trials(self, sweep_dir: Path, metric: str) -> None:
            """Trials a killed search left RUNNING: COMPLETE with the value their job recorded, else FAIL."""
            import optuna

            stale = [t for t in existing_trials(self.study_name, self.storage)
                     if t.state == optuna.trial.TrialState.RUNNING]
            if not stale:
                return
            study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            for trial in stale:
                value = recorded_value(trial.params, sweep_dir, metric)
                if value is None:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial.number, values=[value])
                log.info(f"trial {trial.number}, left running by an earlier search: "
                         f"{'FAIL' if value is None else f'COMPLETE with {value:.4f}'}")

        def sweep(self, arguments: list[str]) -> None:
            import optuna

            try:
                return super().sweep(arguments)
            except ValueError:
                if self.storage is None:
                    raise
                study = optuna.load_study(study_name=self.study_name, storage=self.storage)
                states = [t.state for t in study.trials]
                finished = states.count(optuna.trial.TrialState.COMPLETE)
                stopped = states and states[-1] == optuna.trial.TrialState.FAIL
                if not stopped and finished:
                    raise  # a real error, not a stop for failures or optuna's "no best trial"
                reason = f"more than max_failure_rate={self.max_failure_rate} of a batch of trials failed" if stopped \
                    else "no trial finished"
                log.error(f"Optuna search stopped after {len(study.trials)} trials ({finished} finished): {reason}; "
                          "each failed job's error is in the sweep summary")
