"""Test-wide settings.

One intra-op thread: on the 2-core CI machine, multi-process tests already use both cores, and small matmuls are
far slower with two competing threads than with one (measured: 32x32 matmul, 16 ms vs 4 us under load).
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)
