"""Quiet by default: our own INFO lines and warnings, not every library's.

Without `--verbose` the driver logs the `moref_index` logger at INFO and everything else at WARNING
(open_clip logs its model loading at INFO on the root logger, faiss's loader one line per CPU
feature it probes), and transformers and huggingface_hub draw no progress bars and log errors only.
Ray logs INFO lines of its own ("Started a local Ray instance", each dataset's plan): its driver
logger and Ray Data's console handler go to WARNING too (`ray_logging_level`, `quiet_ray_data_console`;
Ray Data's file log in the session folder keeps everything). transformers and huggingface_hub read
environment variables; the worker processes of a local Ray inherit the driver's,
and on a cluster the runner hands them to the job's workers (`worker_env`, through `ray.init`'s
runtime_env, which Ray merges with the submitted job's own per variable).
"""

from __future__ import annotations

import logging
import os

OUR_LOGGER = "moref_index"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Read by transformers and huggingface_hub when they are imported (and by their progress bars).
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
VERBOSE_ENV = "MOREF_INDEX_VERBOSE"  # set by --verbose, so workers started from here know too


def configure_logging(verbose: bool = False) -> None:
    """The driver's logging: ours at INFO; others at INFO with `verbose`, else at WARNING."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=LOG_FORMAT, force=True)
    logging.getLogger(OUR_LOGGER).setLevel(logging.INFO)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)  # a value the user set wins
    _quiet_loaded_libraries()


def _quiet_loaded_libraries() -> None:
    """The same for libraries imported before the environment was set (they read it on import)."""
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def verbose() -> bool:
    return bool(os.environ.get(VERBOSE_ENV))


def ray_logging_level() -> int:
    """The level of Ray's own driver logger (ray.init's logging_level)."""
    return logging.INFO if verbose() else logging.WARNING


def quiet_ray_data_console() -> None:
    """Ray Data's console handler at WARNING unless verbose (it configures itself on import,
    at INFO: a few lines per dataset)."""
    if verbose():
        return
    import ray.data  # noqa: F401 - its import configures the 'ray.data' logger

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the session log file is not one
            handler.setLevel(logging.WARNING)


def worker_env() -> dict[str, str]:
    """Environment variables for a cluster's workers: the quiet ones unless verbose, leaving out
    any the submitted job already sets (Ray refuses to merge a variable set twice)."""
    if verbose():
        return {}
    job = _job_env_vars()
    return {name: os.environ.get(name, value) for name, value in QUIET_ENV.items() if name not in job}


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env `ray job submit` gave this driver (none outside a job)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
