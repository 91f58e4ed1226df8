"""Ray actors of the daemon, one module each. Each module holds the I/O-free logic
as a plain class (tested without Ray) and the actor that wraps it."""

import os


def limit_threads() -> None:
    """Two cores are all a small machine has: one intra-op thread per actor."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
