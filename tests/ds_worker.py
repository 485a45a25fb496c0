"""`fasttrain` as the DeepSpeed tests start it under a launcher (torchrun or the deepspeed launcher): as
cli_worker.py (FASTTRAIN_TEST_STEP_DELAY slows every optimizer step), and without building DeepSpeed's
shared-memory all-reduce op, whose first build compiles C++ for 45-55 s on a CPU while gloo does the same job
for a tiny model.
"""
import sys

import deepspeed.comm.torch  # noqa: F401  (the module must be loaded to patch it)

# `deepspeed.comm.torch` as an attribute is the torch package itself: take the submodule from sys.modules.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

from cli_worker import main  # noqa: E402  (this folder is on sys.path: the script's own)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
