"""Set-up run in every Ray worker process of a grid's job (`worker_process_setup_hook`).

Stdlib only: every worker pays for what this imports, before any task or actor code runs.
"""

from __future__ import annotations

import logging
import os

# Loggers of Ray's own machinery whose warnings are not about the user's work: Ray Train's
# placement-group watcher warns on every poll that finds the State API slow, which on 2 busy
# cores was 313 lines in one 6-minute LoRA cell, burying the grid's progress lines.
CHATTY = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
LOG_NAME = "clfgrid-ray-chatter.log"


def setup_worker() -> None:
    """The hook itself: each of the set-ups below."""
    pin_cluster_address()
    quiet_ray_chatter()


def pin_cluster_address() -> None:
    """RAY_ADDRESS = this worker's own cluster, so that Ray's state API, called without an address,
    finds it even with other local Rays on the machine (a test suite's, another grid's). Ray
    Train's PlacementGroupCleaner asks the state API whether a training controller is dead before
    it frees the controller's placement group: with two local Rays that call failed ("Found
    multiple active Ray instances"), and a search trial that ASHA stopped kept its CPUs forever."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def quiet_ray_chatter() -> None:
    """Send the CHATTY loggers to a file in the Ray session's log folder, not the driver."""
    import ray

    try:
        folder = ray._private.worker.global_worker.node.get_logs_dir_path()
    except AttributeError:  # no node (a client connection): keep them off the terminal anyway
        folder = None
    for name in CHATTY:
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.handlers.clear()
        if folder:
            handler = logging.FileHandler(os.path.join(folder, LOG_NAME))
            handler.setFormatter(logging.Formatter(f"%(asctime)s pid={os.getpid()} %(name)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
