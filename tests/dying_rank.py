"""Launched by tests/test_distributed.py under torchrun: pre-training in which rank 1 exits abruptly
at step 3, to check that the surviving rank fails instead of waiting forever."""

import os

from bertrecipes import pretrain


def die_on_rank_one(original_step):
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] == 3:
            print("rank 1 dies at step 3", flush=True)
            os._exit(17)
        return original_step(self, *args, **kwargs)

    return step


if __name__ == "__main__":
    from bertrecipes.optim import Lamb

    Lamb.step = die_on_rank_one(Lamb.step)
    pretrain.main()
