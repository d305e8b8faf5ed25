"""The ranks' stop vote (``distributed.StopVote``) in two real gloo processes: whichever rank asks,
at whatever step, every rank must read the same answers in the same order, and the answer turns
true exactly one call after the first request (the lag that keeps the host from waiting on the
all-reduce)."""

from __future__ import annotations

import json

import torch
import torch.distributed
import torch.multiprocessing as mp

from bertrecipes.distributed import DistContext, StopVote

CALLS = 7


def _worker(rank: int, world: int, init_file: str, requests: dict, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        vote = StopVote(DistContext(rank=rank, local_rank=rank, world_size=world), torch.device("cpu"))
        # a rank's flag stays up once raised, as a signal handler's does
        answers = [vote(call >= requests.get(str(rank), CALLS + 1)) for call in range(CALLS)]
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(answers, f)
    finally:
        torch.distributed.destroy_process_group()


def run_vote(tmp_path, requests: dict[str, int]) -> list[list[bool]]:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), requests, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_one_rank_asks_and_both_stop_one_call_later(tmp_path):
    rank0, rank1 = run_vote(tmp_path, {"1": 3})  # rank 1 asks at call 3
    assert rank0 == rank1 == [False] * 4 + [True] * 3


def test_nobody_asks_nobody_stops(tmp_path):
    rank0, rank1 = run_vote(tmp_path, {})
    assert rank0 == rank1 == [False] * CALLS


def test_single_process_answers_at_once():
    vote = StopVote(DistContext(rank=0, local_rank=0, world_size=1), torch.device("cpu"))
    assert [vote(flag) for flag in (False, True, False)] == [False, True, False]
