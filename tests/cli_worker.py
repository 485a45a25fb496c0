"""`fasttrain` as started by a test that kills or signals a run mid-way.

FASTTRAIN_TEST_STEP_DELAY=seconds sleeps after every optimizer step (torch.optim's global step hook, so
whichever trainer runs), so a run that takes well under a second is still running when the test kills it.
"""
import os
import sys
import time

from torch.optim.optimizer import register_optimizer_step_post_hook

delay = float(os.environ.get("FASTTRAIN_TEST_STEP_DELAY", "0"))
if delay:
    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: time.sleep(delay))

from fasttrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
