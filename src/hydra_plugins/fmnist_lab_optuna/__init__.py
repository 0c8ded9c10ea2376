"""fmnist_lab's Optuna sweeper: hydra-optuna-sweeper, where a search that failed trials stop ends in the sweep
summary (and a non-zero exit) instead of a traceback.

fmnist_lab's sweep jobs never raise (one failure must not end a grid sweep): a failed job records its error in
its metrics.json and returns no objective, which hydra-optuna-sweeper marks as a FAIL trial, so
`max_failure_rate` applies. When failures stop the search, or no trial finished, the plugin raises a
ValueError; this sweeper logs why instead. Hydra only loads sweepers from `hydra_plugins`, hence this
package. Used by conf/hparams_search/optuna.yaml.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginSweeper
except ImportError:  # the `sweep` extra is not installed: nothing to offer
    PluginSweeper = None

log = logging.getLogger(__name__)


if PluginSweeper is not None:

    class OptunaSweeper(PluginSweeper):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.study_name, self.storage = kwargs["study_name"], kwargs["storage"]
            self.max_failure_rate = kwargs["max_failure_rate"]

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
