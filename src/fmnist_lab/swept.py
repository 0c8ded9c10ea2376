"""A sweep job's swept values: the keys its sweep varies, as this job set them (`lr=0.03`, `batch_size=64`). They
name the job's TensorBoard run (its folder under tensorboard/) and its MLflow run, come first in TensorBoard's
HPARAMS tab, and are MLflow params of every job, a failed one included. A single run has none."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from fmnist_lab.sweep_machine import is_multirun
from fmnist_lab.sweep_report import short
from fmnist_lab.untrusted import BadFileError, load_yaml

log = logging.getLogger(__name__)
MAX_NAME = 200  # characters of a run name: it is also a folder name, which file systems cap at 255 bytes


def swept_keys(sweep_overrides: Iterable[str], search_space: Mapping[str, Any] | None) -> list[str]:
    """The keys a sweep gives several values: its search space (`hydra.sweeper.params`: Optuna's, or the basic
    sweeper's own) and the sweep overrides of its command line (`lr=0.01,0.1`, `range(...)`, `choice(...)`). A
    job's own overrides hold one value of each, so what varies is read from the sweep's."""
    parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    return list(dict.fromkeys([*(o.key_or_group for o in parsed if o.is_sweep_override()), *(search_space or {})]))


def swept_values(job_overrides: Iterable[str], keys: Iterable[str]) -> list[tuple[str, str]]:
    """The job's own values of `keys`, as its overrides give them, in their order."""
    wanted = set(keys)
    parsed = OverridesParser.create().parse_overrides(list(job_overrides))
    return [(o.key_or_group, o.get_value_element_as_str()) for o in parsed
            if o.key_or_group in wanted and not o.is_delete() and not o.is_sweep_override()]


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The command line's overrides of the sweep, which Hydra's basic sweeper records in
    <sweep dir>/multirun.yaml before its first job; [] where there is none (an Optuna search records none)."""
    path = sweep_dir / "multirun.yaml"
    try:
        task = load_yaml(path)["hydra"]["overrides"]["task"] if path.is_file() else []
    except (BadFileError, OSError, KeyError, TypeError) as err:
        log.warning(f"{path} cannot be read ({err}); this job's runs are not named by their swept values")
        return []
    return [o for o in task if isinstance(o, str)] if isinstance(task, list) else []


def current() -> list[tuple[str, str]]:
    """This sweep job's swept values, from Hydra's record of the job and of its sweep; [] outside a sweep."""
    if not is_multirun():
        return []
    hydra = HydraConfig.get()
    keys = swept_keys(sweep_overrides(Path(hydra.sweep.dir)), hydra.sweeper.get("params"))
    return swept_values(hydra.overrides.task, keys)


def run_name(values: Iterable[tuple[str, str]]) -> str:
    """`lr=0.03,batch_size=64`: floats to 4 significant digits for reading (Optuna proposes
    lr=0.0031622776601683794; the params keep the exact value), "" for a single run."""
    return ",".join(f"{key}={short(value)}" for key, value in values)[:MAX_NAME]


def hparam_name(key: str) -> str:
    """A swept key as the settings name it (`fmnist_lab.tracking.logged_settings`): optimizer.momentum ->
    optimizer/momentum, so that a knob has one column in TensorBoard and MLflow."""
    return key.replace(".", "/")


def hparam_value(value: str) -> float | str:
    """An override's value as a number where it is one (a column TensorBoard can filter by range)."""
    try:
        return float(value)
    except ValueError:
        return value
