"""Collectives run on the training device (NCCL reduces only CUDA tensors): a helper refuses anything else."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from raypipe.train.common import all_reduce_mean, broadcast_from_rank0, check_collective_tensor, world_rank, world_size


@pytest.fixture
def process_group(tmp_path: Path):
    """A real one-rank gloo process group (what a CPU Ray Train worker has)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collective_on_another_device_is_refused() -> None:
    cpu = torch.device("cpu")
    assert check_collective_tensor(torch.zeros(2), cpu).device == cpu
    with pytest.raises(ValueError, match="NCCL cannot reduce CPU tensors"):
        check_collective_tensor(torch.zeros(2), torch.device("cuda"))
    with pytest.raises(ValueError, match="training device"):
        check_collective_tensor(torch.zeros(2, device="meta"), cpu)


def test_helpers_reduce_on_the_given_device(process_group) -> None:
    assert world_rank() == 0 and world_size() == 1
    assert all_reduce_mean(3.0, 2.0, torch.device("cpu")) == pytest.approx(3.0)
    assert broadcast_from_rank0({"val_auroc": 0.7}, torch.device("cpu")) == {"val_auroc": 0.7}


def test_rank_and_size_without_a_process_group() -> None:
    assert not dist.is_initialized()
    assert world_rank() == 0 and world_size() == 1 and all_reduce_mean(2.5, 4.0) == 2.5
