"""Session-wide test settings."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter, so the fused-MoE kernel's
# logic is tested on CPU too; it must be set before any kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
