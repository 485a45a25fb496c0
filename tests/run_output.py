"""What a training process printed: the steps it ran, read from its `step N/TOTAL ...` log lines."""
import re

_STEP_LINE = re.compile(r"^step (\d+)/(\d+) ", re.MULTILINE)


def printed_steps(output: str) -> list[int]:
    """The N of every `step N/TOTAL ...` line, in order (evaluation lines, `step N test_loss ...`, do not count)."""
    return [int(m.group(1)) for m in _STEP_LINE.finditer(output)]
