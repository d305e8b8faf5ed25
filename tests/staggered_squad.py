"""Launched by tests/test_squad_distributed.py under torchrun: SQuAD fine-tuning whose ranks start
1.1 s apart (rank r sleeps 1.1 r s first), as ranks of a busy node may."""

import os
import time

from bertrecipes.squad import __main__ as squad

if __name__ == "__main__":
    time.sleep(1.1 * int(os.environ.get("LOCAL_RANK", "0")))
    squad.main()
