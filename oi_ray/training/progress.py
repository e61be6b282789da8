"""The channel between the driver's console and rank 0: progress, summaries, Ctrl-C.

Workers' own stdout stays in Ray's log files (the session starts with ``log_to_driver``
off), so the driver alone draws the console: one tqdm bar per epoch (only on a terminal)
and one summary line per epoch through logging. The first Ctrl-C asks the workers to stop
at their next check (they agree on it and end the run together); a second one stops at once.
"""

import logging
import queue as queue_module
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from oi_ray.training.early_end import EarlyEnd

log = logging.getLogger("oi_ray.tasks.train")
Result = TypeVar("Result")
POLL_SECONDS = 0.5


class ProgressFeed:
    """Two small Ray queues: rank 0 puts events for the driver, the driver puts stop requests."""

    def __init__(self) -> None:
        # On the driver's node: the queues must outlive any worker node that fails mid-run.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._requests = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.early_end: EarlyEnd | None = None  # driver side: why the workers ended the run early

    def step(self, epoch: int, pairs: int, total: int, loss: float) -> None:
        """Rank 0: ``pairs`` of ``total`` done in ``epoch``, latest batch loss."""
        self._queue.put(("step", epoch, pairs, total, loss))

    def epoch_done(self, metrics: dict[str, Any], num_epochs: int) -> None:
        """Rank 0: the epoch's metrics (train and, when validated, validation)."""
        self._queue.put(("epoch", metrics, num_epochs))

    def note(self, message: str) -> None:
        """Rank 0: a line for the user's console."""
        self._queue.put(("note", message))

    def ended_early(self, end: EarlyEnd) -> None:
        """Rank 0: the workers ended the run before its last epoch."""
        self._queue.put(("ended", end))

    def stop_requested(self) -> bool:
        """Rank 0: whether the user asked the run to stop (Ctrl-C in the driver)."""
        return not self._requests.empty()

    def render_while(self, work: Callable[[], Result], *, quiet: bool = False) -> Result:
        """Driver: run ``work`` in a thread and draw its events until it returns (``quiet``:
        only record how the run ended, e.g. in a sweep trial, which has no console).

        The first Ctrl-C asks the workers to stop; a second one raises KeyboardInterrupt.
        """
        outcome: queue_module.Queue = queue_module.Queue()
        thread = threading.Thread(target=lambda: outcome.put(_capture(work)), daemon=True)
        thread.start()
        console = _Console(quiet)
        try:
            self._draw_until_done(thread, console)
        except KeyboardInterrupt:
            console.close_bar()
            self._requests.put("stop")
            log.info("stopping: the workers end the run at their next step check; "
                     "Ctrl-C again to stop at once")
            self._draw_until_done(thread, console)
        console.close_bar()
        error, result = outcome.get()
        self._queue.shutdown()
        self._requests.shutdown()
        if error is not None:
            raise error
        return result

    def _draw_until_done(self, thread: threading.Thread, console: "_Console") -> None:
        while thread.is_alive() or not self._queue.empty():
            try:
                event = self._queue.get(timeout=POLL_SECONDS)
            except Empty:
                continue
            if event[0] == "ended":
                self.early_end = event[1]
            else:
                console.draw(event)


class _Console:
    """One tqdm bar for the running epoch (drawn only on a terminal), log lines for the rest."""

    def __init__(self, quiet: bool = False) -> None:
        self.bar: tqdm | None = None
        self.epoch: int | None = None
        self.quiet = quiet

    def draw(self, event: tuple) -> None:
        if self.quiet:
            return
        if event[0] == "step":
            _, epoch, pairs, total, loss = event
            if epoch != self.epoch:
                self.close_bar()
                self.bar = tqdm(total=total, unit="pair", desc=f"epoch {epoch}", leave=False, disable=None)
                self.epoch = epoch
            self.bar.update(pairs - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        self.close_bar()
        log.info(event[1] if event[0] == "note" else summary_line(*event[1:]))

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.epoch = None, None


def summary_line(metrics: dict[str, Any], num_epochs: int) -> str:
    """One readable line per epoch."""
    parts = [f"epoch {metrics['epoch']}/{num_epochs}", f"train_loss {metrics['train_loss']:.4f}",
             f"{metrics['pairs_per_s']:.0f} pairs/s", f"{metrics['seconds']:.1f} s"]
    if "val_loss" in metrics:
        parts += [f"val_loss {metrics['val_loss']:.4f}", f"val_auroc {metrics['val_auroc']:.3f}",
                  f"val_acc {metrics['val_acc']:.1f}% at margin",
                  f"threshold {metrics['threshold']:.3f} (recall "
                  f"{metrics['val_defect_recall_fraction_of_defects']:.1%}, false alarms "
                  f"{metrics['val_false_alarm_fraction_of_pass_pairs']:.1%} of PASS)"]
    return " | ".join(parts)


def _capture(work: Callable[[], Result]) -> tuple[BaseException | None, Result | None]:
    try:
        return None, work()
    except BaseException as error:  # handed to the driver's main thread
        return error, None
