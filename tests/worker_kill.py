"""Kill one Ray Train worker process of a running training run, as a preempted node or an OOM kill would."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

# How far a run whose worker was killed may end from the uninterrupted one. Checkpoints keep every rank's RNG
# states and a restarted worker takes its own up again, so the restart draws the crops, flips and data-loader seeds
# the uninterrupted run drew: the two agree to float noise (seen: identical). Before checkpoints kept them
# (2026-11-29, these tests' configs), the restarted epochs drew another seed's augmentations and ended 0.034 away in
# val_mAP, beyond the 0.027 range of five uninterrupted seeds: no tolerance could tell a faithful restart there.
KILLED_RUN_TOLERANCE = 1e-5


class WorkerKiller(threading.Thread):
    """Once the run at ``run_dir`` has registered its first checkpoint, SIGKILL one of its live Ray Train workers.

    Registered, not just written: rank 0 writes its checkpoint directory before every rank has reported the
    epoch, and a kill in between rightly restarts from scratch. Ray Train records the checkpoints it registered in
    ``checkpoint_manager_snapshot.json``, the file it restores a run from.

    Start it, run the training in this thread, then ``join``: ``killed_pid`` is the process killed and
    ``workers_started_after`` how many Ray Train workers were started after the kill (a worker group restarted
    by ``FailureConfig`` starts every rank again)."""

    def __init__(self, run_dir: Path, address: str, timeout: float = 180):
        super().__init__(daemon=True)
        self.run_dir, self.address, self.timeout = run_dir, address, timeout
        self.killed_pid: int | None = None
        self.error: BaseException | None = None
        self._before: set[str] = set()

    def _workers(self, alive_only: bool):
        from ray.util.state import list_actors

        filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive_only else [])
        return list_actors(address=self.address, filters=filters, limit=10_000, raise_on_missing_output=False)

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            while not self._registered_checkpoints():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no checkpoint under {self.run_dir} within {self.timeout} s")
                time.sleep(0.05)
            self._before = {actor.actor_id for actor in self._workers(alive_only=False)}
            victim = next(actor for actor in self._workers(alive_only=True) if actor.pid)
            os.kill(victim.pid, signal.SIGKILL)
            self.killed_pid = victim.pid
        except BaseException as err:  # re-raised by join, in the test's thread
            self.error = err

    def _registered_checkpoints(self) -> int:
        try:
            snapshot = json.loads((self.run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return 0
        return len(snapshot.get("checkpoint_results", []))

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error
        assert self.killed_pid is not None, "no worker was killed"
        self.workers_started_after = len(
            {actor.actor_id for actor in self._workers(alive_only=False)} - self._before
        )
