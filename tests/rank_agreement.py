"""Run under torchrun by the tests: each rank claims another restart count, as two nodes do after one
node's workers were restarted, and another output_dir, as two nodes' time-stamped defaults are."""

import os

import torch

from bertrecipes.distributed import DistributedConfig, init_distributed, same_on_every_rank, shutdown
from bertrecipes.errors import ConfigError

rank = int(os.environ["RANK"])
os.environ["TORCHELASTIC_RESTART_COUNT"] = "1" if rank == 1 else "0"  # only node 1's workers failed
ctx = init_distributed(DistributedConfig(), torch.device("cpu"))
print(f"rank {rank} attempt {ctx.attempt}", flush=True)
same_on_every_rank("/shared/run", "output_dirs", "give one", ctx)  # agreeing: nothing said
try:
    same_on_every_rank(f"/runs/node{rank}", "output_dirs", "give one", ctx)
except ConfigError as e:
    print(f"rank {rank} refused: {e}", flush=True)
shutdown(ctx)
