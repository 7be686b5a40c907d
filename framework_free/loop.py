"""The epoch loop both trainers share: what happens between epochs is framework-free.

A trainer subclasses `EpochLoop` and supplies the framework's parts: `run_epoch()` (train one
epoch and evaluate; returns its metrics), `save(best)`, `state_digest()`, `clear_epoch_sums()`,
`stop_at_epoch_end()` (do all processes agree to stop now?) and `describe()` (the opening line),
plus the attributes recipe, record, is_main, epoch, step_in_epoch, global_step and best_acc.
"""

from __future__ import annotations

from framework_free import console
from framework_free.preemption import Preempted


class EpochLoop:
    def run(self) -> dict:
        """Train to the recipe's last epoch (from wherever the run stands) and return the
        final metrics. Raises Preempted when a stop was requested at an epoch boundary."""
        r = self.recipe
        if self.is_main:
            console.say(self.describe())
        last = {}
        while self.epoch < r.epochs:
            metrics = self.run_epoch()
            self.epoch += 1
            self.step_in_epoch = 0
            self.clear_epoch_sums()
            best = metrics["test_acc"] > self.best_acc
            if best:
                self.best_acc = metrics["test_acc"]
            metrics["best_test_acc"] = self.best_acc
            metrics["state_digest"] = self.state_digest()
            # record, then best, then last: a crash between any two of them resumes from the
            # previous `last`, which rewinds the record and redoes the epoch identically
            self.record.log(**metrics)
            self.save(best)
            self.record.plot()
            if self.is_main:
                console.say(console.epoch_line(metrics, r.epochs))
            last = metrics
            if self.epoch < r.epochs and self.stop_at_epoch_end():
                raise Preempted(self.global_step)
        if not last and self.is_main:
            console.say(f"the run in {self.record.workdir} already finished {r.epochs} epochs "
                        f"(best test accuracy {100 * self.best_acc:.2f}%)")
        return {"best_test_acc": self.best_acc, "global_step": self.global_step, **last}
