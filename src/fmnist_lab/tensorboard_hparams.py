"""A run's row in TensorBoard's HPARAMS tab, and the folder a sweep job's TensorBoard run is named by.

The row is written with TensorBoard's own hparams protos (api_pb2, plugin_data_pb2, metadata) through torch's event
file writer: the three summaries Lightning's `log_hyperparams` writes (experiment, session start, session end), with
what it cannot set. What decides the tab's columns (TensorBoard 2.x's hparams plugin): the server takes the
experiment summary of one run (any one: every job of a sweep writes the same), lists the hyperparameters it marks
`differs` first and the others by name, and the page ticks the first five of them and the first five metrics in the
experiment's order. So a sweep job's experiment lists its swept keys (marked `differs`) and no other setting, which
would be ticked after them, and the objective (`optimized_metric`) first among its metrics: the table opens on the
swept values next to the objective. The other settings, the same for every job, are in each session's values (and
in MLflow's params); a single run's experiment lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard.writer import FileWriter

from fmnist_lab import swept

FINAL = ("val/acc_best", "test/acc", "test/loss")  # metrics.json's numbers every run's row has, where it has them
STATUS = {"success": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE}
EVENTS = "*tfevents*"  # TensorBoard reads the files whose name holds "tfevents" (io_wrapper.IsSummaryEventsFile)


def run_folder(root: Path, name: str) -> str:
    """The folder under a run's tensorboard/ (`root`) that its events go to: the one its curves are in already (a
    resumed or restarted job keeps writing there, whatever it is resumed as: resume=<job folder> runs outside the
    sweep), else `name`, a sweep job's swept values; "" (tensorboard/ itself) for a single run."""
    if any(root.glob(EVENTS)):
        return ""
    earlier = sorted({path.parent.name for path in root.glob(f"*/{EVENTS}")})
    return name if name in earlier or not earlier else earlier[0]


def logger_folder(node: Mapping[str, Any]) -> dict[str, str]:
    """The `version` (folder under save_dir/name) for a TensorBoardLogger's config `node`; a version the config
    gives stays as it is."""
    if node.get("version"):
        return {}
    name = swept.run_name(swept.current()).replace("/", "_")  # one folder, even for a path's value
    return {"version": run_folder(Path(node["save_dir"]) / node["name"], name)}


def number(value: Any) -> float | None:
    """A metric's value as a float (a tensor's too), None for what is no number."""
    try:
        return None if isinstance(value, bool | str) or value is None else float(value)
    except (TypeError, ValueError):
        return None


def final_numbers(metrics: Mapping[str, Any], objective: Any) -> dict[str, float | None]:
    """hp/<metric> for the objective (`optimized_metric`, one name or a list) first, then FINAL; None where the
    run has no such number (a failed job)."""
    names = [objective] if isinstance(objective, str) else [str(name) for name in objective or []]
    return {f"hp/{name.replace('/', '_')}": number(metrics.get(name)) for name in dict.fromkeys([*names, *FINAL])}


def with_swept(hparams: Mapping[str, Any], values: Iterable[tuple[str, str]]) -> tuple[dict[str, Any], set[str]]:
    """The settings with the swept keys first (their value from the settings where those name it, else the
    override's: trainer.limit_train_batches=40 -> trainer/limit_train_batches), and the swept names."""
    given = {swept.hparam_name(key): swept.hparam_value(value) for key, value in values}
    return {**{k: hparams.get(k, v) for k, v in given.items()}, **hparams}, set(given)


def hparam_info(name: str, value: Any, differs: bool) -> api_pb2.HParamInfo:
    kind = api_pb2.DATA_TYPE_BOOL if isinstance(value, bool) else \
        api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, int | float) else api_pb2.DATA_TYPE_STRING
    return api_pb2.HParamInfo(name=name, type=kind, differs=differs)


def session_start(hparams: Mapping[str, Any]) -> plugin_data_pb2.SessionStartInfo:
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = str(value)
    return start


def summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                        tensor=metadata.NULL_TENSOR)])


def record(logger: TensorBoardLogger, hparams: Mapping[str, Any], numbers: Mapping[str, float | None],
           values: Iterable[tuple[str, str]], status: str, step: int | None) -> None:
    """The run's HPARAMS row in `logger`'s run: `hparams` (the settings) with the swept `values`, the columns the
    swept keys (else every setting), `numbers` (objective first) as hp/* scalars (a None leaves its cell empty),
    and the status ("success" or "failed")."""
    hparams, differs = with_swept(hparams, values)
    logger.log_metrics({k: v for k, v in numbers.items() if v is not None}, step)
    columns = [hparam_info(k, v, True) for k, v in hparams.items() if k in differs] or \
        [hparam_info(k, v, False) for k, v in hparams.items()]
    experiment = api_pb2.Experiment(
        hparam_infos=columns,
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in numbers])
    end = plugin_data_pb2.SessionEndInfo(status=STATUS[status], end_time_secs=time.time())
    writer = FileWriter(logger.log_dir)  # its own event file in the run's folder: one TensorBoard run
    try:
        for tag, data in ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                          (metadata.SESSION_START_INFO_TAG,
                           plugin_data_pb2.HParamsPluginData(session_start_info=session_start(hparams))),
                          (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))):
            writer.add_summary(summary(tag, data), step)
    finally:
        writer.close()
