"""Device helpers that need no GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline import device as dev

CPU = torch.device("cpu")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_resets_between_measurements():
    block = np.ones(256 * 2**20 // 8)  # 256 MB, touched
    with_block = dev.peak_memory_mb(CPU)
    del block
    dev.reset_peak_memory(CPU)
    assert dev.peak_memory_mb(CPU) < with_block - 200
