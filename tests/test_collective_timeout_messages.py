"""Every way gloo words a collective's timeout is read as a frozen peer (exit 5, one line), not as a
crash with a traceback. Gloo raises "Timed out waiting ..." in the operation that ran out of time
and "Application timeout caused pair closure" in the others on the same pairs (DDP's concurrent
bucket all-reduces); which one reaches the training loop first is a race."""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from train.distributed import peer_timeout

pytestmark = pytest.mark.processes


def wait_for_a_silent_peer(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    if rank == 1:  # joins, then answers nothing
        time.sleep(10)
        return
    in_flight = [dist.all_reduce(torch.ones(4), async_op=True) for _ in range(2)]  # like DDP's buckets
    seen = []
    for work in in_flight:
        try:
            work.wait()
        except RuntimeError as error:
            seen.append((str(error), peer_timeout(error) is not None))
    try:
        dist.all_reduce(torch.ones(4))  # the next collective on the closed pairs
    except RuntimeError as error:
        seen.append((str(error), peer_timeout(error) is not None))
    results.put(seen)


def test_both_of_gloos_timeout_messages_are_a_peer_timeout():
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=wait_for_a_silent_peer, args=(rank, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    seen = results.get()
    for process in processes:
        process.join(timeout=30)
    messages = [message for message, _ in seen]
    assert any("Timed out waiting" in message for message in messages), messages
    assert any("Application timeout caused pair closure" in message for message in messages), messages
    assert all(recognised for _, recognised in seen), seen
