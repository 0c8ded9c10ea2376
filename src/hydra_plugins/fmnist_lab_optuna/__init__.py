"""fmnist_lab's Optuna sweeper (`hparams_search=optuna`): a Hydra sweeper on Optuna's ask/tell API.

- The search space: `hydra.sweeper.params` and any sweep override on the command line, in Hydra's override syntax
  (`interval(a, b)`, `tag(log, interval(a, b))`, `choice(...)`, `range(a, b[, step])`), parsed with Hydra's
  override parser. Other overrides are the same for every trial.
- Trials are asked in batches of `n_jobs` and launched together through the chosen launcher (basic, joblib,
  submitit, SLURM). A trial whose job failed or returned a non-finite objective is FAIL; a batch with more than
  `max_failure_rate` of its trials failed stops the search, and the sweep summary says which jobs failed.
- Several objectives: `optimized_metric` a list and `directions` one direction per metric; each job returns a
  list of values, the study keeps them under the metrics' names, and the sweep summary marks the Pareto front.
  Each trial records its job folder as the user attribute `run_dir` (shown by optuna-dashboard).
- Run again with the same `hydra.sweep.dir`, a search continues its study (`<sweep dir>/optuna.db`):
  `n_trials` is the study's total, trials a killed search left RUNNING are closed (COMPLETE with the value
  their job recorded, else FAIL), and the sampler is reseeded, so new trials do not repeat the first ones.

Hydra only loads sweepers from `hydra_plugins`, hence this package; conf/hydra/sweeper/ holds its configs.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper

log = logging.getLogger(__name__)


def recorded_value(params: dict[str, Any], sweep_dir: Path, metric: Any) -> float | list[float] | None:
    """The objective (`optimized_metric`: one value, or a list) that a finished job with exactly these parameters
    recorded in the sweep folder."""
    from fmnist_lab.run_dir import BadFileError, RunDir
    from fmnist_lab.sweep_objective import objective_values

    for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
        given = dict(o.split("=", 1) for o in job_overrides(overrides) if "=" in o)
        if all(given.get(name) == str(value) for name, value in params.items()):
            try:
                value = objective_values(RunDir(overrides.parent.parent).finished(), metric)
            except BadFileError:
                continue
            if value is not None:
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


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (choice, range, interval, with `tag(log, ...)`)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    name, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        # range(a, b) stops before b, as Python's range and Hydra's grid sweeps do
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop - value.step, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - int(value.step), step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{name}: a search parameter is a choice, range or interval sweep, not {override.input_line}")


def search_space(params: dict[str, str] | None, arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions to search (from `params`, then the command line's sweep overrides) and the overrides
    that every trial gets."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in (params or {}).items()]) + \
        parser.parse_overrides(list(arguments))
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in overrides:
        name = override.get_key_element()
        if override.is_sweep_override():
            space[name] = distribution(override)
            fixed = [f for f in fixed if f.split("=", 1)[0] != name]
        else:
            space.pop(name, None)  # a value given on the command line is not searched
            fixed.append(override.input_line)
    return space, fixed


def grid_values(name: str, distribution: Any) -> list[Any]:
    """The values of one parameter of a grid search; SystemExit for a continuous interval."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if getattr(distribution, "step", None) is not None:
        count = round((distribution.high - distribution.low) / distribution.step) + 1
        return [distribution.low + i * distribution.step for i in range(count)]
    raise SystemExit(f"error: hydra/sweeper/sampler=grid tries every combination of the values of each parameter, "
                     f"and {name} is an interval, with no list of values. Give it as choice(...) or range(...) in "
                     "hydra.sweeper.params, or choose another sampler (tpe, random, cmaes, gp).")


def make_sampler(sampler: Any, space: dict[str, Any]) -> tuple[Any, int | None]:
    """The sampler for `space`, and the number of trials it can propose (None: no limit). The grid sampler comes
    as a partial (its config's `_partial_`) that takes the grid."""
    from optuna.samplers import BaseSampler

    if isinstance(sampler, BaseSampler):
        return sampler, None
    grid = {name: grid_values(name, distribution) for name, distribution in space.items()}
    return sampler(search_space=grid), math.prod(len(values) for values in grid.values())


def tell(study: Any, trial: Any, value: float | list[float] | None) -> None:
    """Record a trial's end: its value (a list for several objectives), or FAIL for None. The grid sampler stops
    the study once every combination has run, which Optuna allows only inside `optimize`: with ask/tell that
    raises, after the trial is stored."""
    import optuna

    try:
        if value is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, value)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def objective(value: Any, count: int) -> float | list[float] | None:
    """A job's returned objective as a finite float, or a list of `count` of them for a multi-objective search;
    None for anything else (a failed job returns None)."""
    try:
        values = [float(v) for v in (value if count > 1 else [value])]
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(map(math.isfinite, values)):
        return None
    return values if count > 1 else values[0]


class OptunaSweeper(Sweeper):
    # its jobs are named by number and time, and a used sweep folder is continued by its study (fmnist_lab.sweep)
    continues_a_study = True

    def __init__(self, sampler: Any, direction: str, study_name: str, storage: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: dict[str, str] | None = None,
                 directions: list[str] | None = None) -> None:
        self.sampler, self.direction, self.study_name, self.storage = sampler, direction, study_name, storage
        self.directions = None if directions is None else list(directions)
        self.n_trials, self.n_jobs, self.max_failure_rate = n_trials, max(1, n_jobs), max_failure_rate
        self.params = dict(params or {})

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        import optuna

        from fmnist_lab.sweep_objective import Objective

        # Optuna's lines through Hydra's logging, which keeps library lines off the console (hydra.verbose shows them)
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        metric = self.config.get("optimized_metric", "val/acc_best")
        objective_of_study = Objective.of_search(metric, self.direction, self.directions)
        if objective_of_study.multi and isinstance(self.sampler, optuna.samplers.CmaEsSampler):
            raise SystemExit(f"error: hydra/sweeper/sampler=cmaes searches for one objective, and this search has "
                             f"{len(objective_of_study.metrics)} ({objective_of_study.title()}). Choose "
                             "hydra/sweeper/sampler=tpe (the default), gp, random or grid, or optimize one metric.")
        space, fixed = search_space(self.params, arguments)
        self.sampler, combinations = make_sampler(self.sampler, space)
        n_trials = min(self.n_trials, combinations or self.n_trials)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        study = self.open_study(objective_of_study)
        earlier = len(study.trials)
        if earlier:  # a continued search: n_trials in all, and a sampler that does not start over
            self.sampler.reseed_rng()  # seeded from `seed`, it would propose the first trials again
            close_stale_trials(study, sweep_dir, metric)
            log.info(f"continuing the study {self.study_name} ({earlier} trials so far): "
                     f"{max(0, n_trials - earlier)} more")
        job = 0
        while (to_go := n_trials - len(study.trials)) > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, to_go))]
            batch = [(*fixed, *(f"{name}={value}" for name, value in trial.params.items())) for trial in trials]
            returns = self.launcher.launch(batch, initial_job_idx=job)
            job += len(batch)
            failed = 0
            for trial, ret in zip(trials, returns, strict=True):
                value = objective(ret.return_value if ret.status == JobStatus.COMPLETED else None,
                                  len(objective_of_study.metrics))
                failed += value is None
                if ret.hydra_cfg is not None:  # which job folder holds the trial's run, for the dashboard
                    trial.set_user_attr("run_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
                tell(study, trial, value)
            if failed / len(trials) > self.max_failure_rate:
                log.error(f"Optuna search stopped after {len(study.trials)} trials: {failed} of a batch of "
                          f"{len(trials)} failed, more than max_failure_rate={self.max_failure_rate}; each failed "
                          "job's error is in the sweep summary")
                return
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if finished and objective_of_study.multi:
            front = sorted(t.number for t in study.best_trials)
            log.info(f"Pareto front of {objective_of_study.title()}: trials {', '.join(map(str, front))}")
        elif finished:
            log.info(f"best trial {study.best_trial.number}: {study.best_value:.4f} with {study.best_params}")

    def open_study(self, objective: Any) -> Any:
        """The study, new or continued; SystemExit with one paragraph for a storage an older or newer Optuna wrote
        (its tables differ), or a study made for other objectives: it is not changed without the user's word."""
        import optuna

        directions = ["maximize" if mode == "max" else "minimize" for mode in objective.modes]
        try:
            study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                        directions=directions, load_if_exists=True)
        except RuntimeError as err:
            if "no longer compatible with the table schema" not in str(err):
                raise
            written_by = re.search(r"\(set up by optuna ([^)]*)\)", str(err))
            by = f"Optuna {written_by[1]}" if written_by else "another Optuna"
            fix = (f"Back it up, then upgrade its tables with `optuna storage upgrade --storage {self.storage}` and "
                   "run the search again" if "storage upgrade" in str(err) else
                   "Install the Optuna that wrote it, or a newer one")
            raise SystemExit(f"error: the study storage {self.storage} was written by {by}, and Optuna "
                             f"{optuna.__version__} cannot read its tables as they are, so no trial was run. {fix}; "
                             "or leave hydra.sweep.dir out for a new study.") from None
        made_for = [d.name.lower() for d in study.directions]
        if made_for != directions or study.metric_names not in (None, list(objective.metrics)):
            what = ", ".join(f"{name} ({d[:3]})" for name, d in zip(study.metric_names, made_for, strict=True)) \
                if study.metric_names else ", ".join(made_for)
            raise SystemExit(f"error: the study {self.study_name} in {self.storage} was made for {what}, and this "
                             f"search is for {objective.title()}, so no trial was run. Give optimized_metric and "
                             "hydra.sweeper.direction(s) as that study had them to continue it, or leave "
                             "hydra.sweep.dir out (or set hydra.sweeper.study_name) for a new study.")
        if study.metric_names is None:  # the dashboard and study.trials_dataframe() name the values with them
            with warnings.catch_warnings():  # experimental since Optuna 3.2, and unchanged since
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(objective.metrics))
        return study


def close_stale_trials(study: Any, sweep_dir: Path, metric: Any) -> None:
    """Trials a killed search left RUNNING: COMPLETE with the value their job recorded, else FAIL."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        value = recorded_value(trial.params, sweep_dir, metric)
        tell(study, trial.number, value)
        log.info(f"trial {trial.number}, left running by an earlier search: "
                 f"{'FAIL' if value is None else f'COMPLETE with {value:.4f}'}")
