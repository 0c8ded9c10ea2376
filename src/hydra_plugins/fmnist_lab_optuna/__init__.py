"""fmnist_lab's Optuna sweeper: hydra-optuna-sweeper, with failed trials that count and never crash a search.

fmnist_lab's sweep jobs never raise (one failure must not end a grid sweep): a failed job records its error
and returns no objective. This sweeper turns such jobs back into failed trials, so Optuna marks them FAIL
and `max_failure_rate` applies; a search stopped by failures, or one in which no trial finished, ends in the
sweep summary (and a non-zero exit) instead of a traceback. Hydra only loads sweepers from `hydra_plugins`,
hence this package. Used by conf/hparams_search/optuna.yaml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _PluginSweeper
except ImportError:  # the `sweep` extra is not installed: nothing to offer
    _PluginSweeper = None

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A sweep job that recorded a failure (exception or non-finite objective) instead of a result."""


class FailedJobsFail:
    """Launcher proxy: a job that returned no objective becomes a failed job, with the error it recorded."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        for ret in returns:
            if ret.status == JobStatus.COMPLETED and ret._return_value is None:
                path = Path(ret.hydra_cfg.hydra.runtime.output_dir) / "metrics.json" if ret.hydra_cfg else None
                error = json.loads(path.read_text()).get("error") if path and path.is_file() else None
                ret.status = JobStatus.FAILED
                ret.return_value = JobFailed(error or "the job returned no objective")
        return returns


if _PluginSweeper is not None:

    class OptunaSweeper(_PluginSweeper):
        def setup(self, **kwargs: Any) -> None:
            super().setup(**kwargs)
            self.sweeper.launcher = FailedJobsFail(self.sweeper.launcher)

        def sweep(self, arguments: list[str]) -> None:
            import optuna

            try:
                return super().sweep(arguments)
            except (JobFailed, ValueError) as err:
                if self.sweeper.storage is None:
                    raise
                study = optuna.load_study(study_name=self.sweeper.study_name, storage=self.sweeper.storage)
                finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
                if isinstance(err, ValueError) and finished:
                    raise  # a real error, not optuna's "no best trial" when none finished
                reason = "no trial finished" if isinstance(err, ValueError) else (
                    f"more than max_failure_rate={self.sweeper.max_failure_rate} of a batch of {self.sweeper.n_jobs} "
                    f"trials failed; last error: {err}")
                log.error(f"Optuna search stopped after {len(study.trials)} trials ({finished} finished): {reason}")
