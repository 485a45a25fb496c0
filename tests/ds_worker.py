"""`fasttrain` as the tests start it when they need more than the plain command (DeepSpeed under torchrun or
the deepspeed launcher, or a run slow enough to be stopped mid-way).

Two test-only changes before handing over to fasttrain.cli.main:
- DeepSpeed's shared-memory all-reduce op is not built: its first build compiles C++ for 45-55 s on a CPU,
  and gloo does the same job for a tiny model.
- FASTTRAIN_TEST_STEP_DELAY=seconds sleeps after every optimizer step (of any engine), so a test can kill
  or signal a run mid-way.
"""
import os
import sys
import time

import deepspeed.comm.torch  # noqa: F401  (the module must be loaded to patch it)

# `deepspeed.comm.torch` as an attribute is the torch package itself: take the submodule from sys.modules.
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

delay = float(os.environ.get("FASTTRAIN_TEST_STEP_DELAY", "0"))
if delay:
    from fasttrain.train.distributed import DeepSpeedEngine
    from fasttrain.train.engine import SingleEngine
    from fasttrain.train.packed import PackedEngine

    def slowed(step):
        def slow_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            time.sleep(delay)
            return out

        return slow_step

    for engine in (SingleEngine, PackedEngine, DeepSpeedEngine):
        engine.step = slowed(engine.step)

from fasttrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
