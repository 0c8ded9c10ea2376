"""fmnist_lab's joblib launcher: hydra-joblib-launcher's, with a sweep that ends as a whole however it is stopped.
`hydra/launcher=joblib` selects it, with the same options (n_jobs, ...).

- SIGTERM or Ctrl-C (SIGINT) to the sweep process, at any moment: running jobs stop as a signalled run does
  (at the end of a batch, marked interrupted), jobs not started yet are not started, and the sweep process
  exits 143 or 130 once every job has its row in summary.csv. A second signal ends the workers at once.
- A job interrupted on its own (a signal to its worker) stops the sweep the same way.
- A worker that dies (killed, out of memory) makes joblib end every other worker at once; the jobs cut off are
  marked interrupted and the sweep exits 1.
- Every worker ends with the sweep process, however that ends (SIGKILL too): each one watches it.
Running the same command again with hydra.sweep.dir=<sweep dir> continues a stopped sweep.

Hydra only loads plugins from `hydra_plugins`, hence this package; the workings are in `_core` (a module that
Hydra's plugin scan leaves alone).
"""

# no `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules, where
# a dataclass would look its string annotations up
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin

try:
    from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as PluginLauncher
except ImportError:  # the `sweep` extra is not installed: nothing to offer
    PluginLauncher = None

if PluginLauncher is not None:

    class JoblibLauncher(PluginLauncher):
        # a signal stops the sweep as a whole in the sweep process, not in the job that got it (fmnist_lab.sweep)
        stops_the_sweep_itself = True

        def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
            self.signals = catch_signals(config)

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            from hydra_plugins.fmnist_lab_joblib._core import launch

            return launch(self, job_overrides, initial_job_idx)

    def catch_signals(config: Any) -> Any:
        """The sweep process's handler of SIGTERM and SIGINT, installed once: by SweepSummary.on_multirun_start,
        before the sweeper and this launcher exist (the sweeper composes every job's config before the launch),
        so that a signal at any moment of the sweep stops it as a whole."""
        from hydra_plugins.fmnist_lab_joblib import _core

        if _core.SIGNALS is None:
            _core.SIGNALS = _core.SweepSignals(config)
        return _core.SIGNALS

    @dataclass
    class FmnistLabJoblibConf(JobLibLauncherConf):
        _target_: str = "hydra_plugins.fmnist_lab_joblib.JoblibLauncher"

    class SelectFmnistLabJoblib(SearchPathPlugin):
        """Makes `hydra/launcher=joblib` this launcher: its entry replaces the joblib plugin's own in Hydra's
        ConfigStore. Here, because Hydra calls search path plugins after importing every plugin module (its scan
        runs each one again, so a plain store at import could be overwritten by the joblib plugin's) and before
        composing any config. A conf/hydra/launcher/joblib.yaml would not do: Hydra validates a config file
        against the ConfigStore entry of the same name, with a deprecation warning on every run."""

        def manipulate_search_path(self, search_path: Any) -> None:
            ConfigStore.instance().store(group="hydra/launcher", name="joblib", node=FmnistLabJoblibConf,
                                         provider="fmnist_lab")
