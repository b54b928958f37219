"""What every example step shares: the step protocol's exit codes and reading its input.

The protocol (docs/config.md): JSON on stdin, JSON on stdout, exit 0 = success, exit 65 =
permanent failure (the job goes to the dead-letter queue), any other exit = retry. A step runs as
`python3 steps/<name>.py`, so this folder is on the import path (examples/nightly/steps adds it).
"""

import json
import os
import sys

EX_DATAERR = 65  # permanent: bad input will not get better by retrying
EX_TEMPFAIL = 75  # retryable


def fail(message, code=EX_DATAERR):
    """Ends the step with `message` on stderr (kept with the failure) and exit `code`."""
    # The step's name as the config has it; a file that serves several steps has one per run.
    step = os.environ.get("WARREN_STEP") or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    print(f"{step}: {message}", file=sys.stderr)
    sys.exit(code)


def read_object(what="a JSON object"):
    """The step input, which must be a JSON object; anything else fails the job for good."""
    try:
        value = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        fail(f"input is not JSON: {e}")
    if not isinstance(value, dict):
        fail(f"input must be {what}, got {type(value).__name__}")
    return value
