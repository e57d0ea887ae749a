"""Fixtures shared by the test suite (the multi-process helper is ``tests.distributed.run_workers``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist

from gradzip.util import free_port


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    """A gloo process group of one (this process), for code that needs torch.distributed initialised."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield
    if owned:
        dist.destroy_process_group()
