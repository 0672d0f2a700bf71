"""Test set-up shared by all test files: tiny models on the path, quiet libraries."""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest -n N: share the cores between the workers. N workers x all cores of threads each
    # oversubscribe the CPU (tiny models: several times slower); subprocesses (DDP ranks, the CLI,
    # notebook kernels) inherit the setting through OMP_NUM_THREADS.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
