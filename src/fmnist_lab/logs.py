"""What goes to the console and what to the run's log file alone. The console shows fmnist_lab's own lines and
Hydra's; every library's log lines and warnings go to the log file alone (with their times), since a user can
act on none of them; `hydra.verbose=true` puts them on the console as well. conf/hydra/job_logging/ and
conf/hydra/hydra_logging/ name the filter; `route_warnings` routes the warnings. Light on purpose: Hydra
builds the filter before any job, where a config error answers without torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
OWN_LOGGERS = ("fmnist_lab", "hydra")  # ours, Hydra's, and our Hydra plugins' (hydra_plugins.*)


LABEL = ""  # "job 3: " before each console line of a sweep job that runs beside others (label_lines)


def label_lines(label: str) -> None:
    """Put `label` before this process's console lines from now on: parallel jobs' lines interleave."""
    global LABEL
    LABEL = f"{label}: "


class ConsoleFormatter(logging.Formatter):
    """The console's lines: the message, after the job's label; a warning or an error says it is one."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return LABEL + (f"{record.levelname}: {text}" if record.levelno >= logging.WARNING else text)


class ProjectLines(logging.Filter):
    """A console handler's filter: fmnist_lab's and Hydra's records, and every record under hydra.verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(OWN_LOGGERS) or logging.getLogger().isEnabledFor(logging.DEBUG)


def route_warnings() -> None:
    """Python warnings go where `show_warning` sends them, for the rest of this process: the Hydra app's job
    (fmnist_lab.cli) calls it, code that calls fmnist_lab from Python keeps its own handling of warnings."""
    warnings.showwarning = show_warning


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                 line: str | None = None) -> None:
    """Python's hook for showing a warning (warnings.showwarning, documented as replaceable): one of fmnist_lab's
    own goes to its logger, and so to the console; a library's to `py.warnings`, and so to the log file."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        logging.getLogger("fmnist_lab.warnings").warning(str(message))
    else:
        logging.getLogger("py.warnings").warning(warnings.formatwarning(message, category, filename, lineno,
                                                                         line).rstrip())


def quiet_libraries() -> None:
    """Lightning's log lines go through Hydra's handlers (the run's log file) once, minus ads; the ONNX
    exporter's pass-by-pass INFO lines are left out."""
    logging.getLogger("lightning").handlers.clear()  # its own console handler doubles every line under Hydra
    # A console that went away (`| head`) must not print a traceback per log line; console.show then points
    # stdout at /dev/null, and the run's log file keeps every line.
    logging.raiseExceptions = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "Tip:" not in r.getMessage())
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning-internal
    # A resumed run's checkpoint folder is its own, expected to be there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Under DDP every logged value is already the same on all ranks (torchmetrics combines them in compute(), the
    # train loss is reduced before it is read), so no `sync_dist`: that would add collectives that only rank
    # zero's console line triggers, and a collective called by one rank alone hangs or aborts the job.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting")
