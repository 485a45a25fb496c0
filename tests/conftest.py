import os

import torch

# Triton kernels run under the interpreter when no GPU is present. The variable must be set before any
# @triton.jit function is defined, so before any test module imports fasttrain.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
