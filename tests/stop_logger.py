"""A dashboard logger for runs launched by the tests: at step ``STOP_AT_STEP`` (environment) it sends
its own process a SIGTERM, as a scheduler would (under torchrun it exists on rank 0 only)."""

import os
import signal


class StopAtStep:
    def __init__(self, run_config=None, output_dir=None, default_name=None):
        self.stop_at = int(os.environ["STOP_AT_STEP"])

    def log(self, metrics, step):
        if step == self.stop_at and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    def finish(self):
        pass


class CrashAtStep(StopAtStep):
    """Raises at step ``STOP_AT_STEP``: a run that crashes mid-training."""

    def log(self, metrics, step):
        if step == self.stop_at and "loss" in metrics:
            raise RuntimeError(f"crash at step {step}")


class StopTwiceAtStep(StopAtStep):
    """At step ``STOP_AT_STEP`` sends two SIGTERMs, each handled before the next (Slurm's and the one
    torchrun forwards), in the middle of the step's logging."""

    def log(self, metrics, step):
        if step == self.stop_at and "loss" in metrics:
            import time

            for _ in range(2):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler runs here
