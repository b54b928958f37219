#!/usr/bin/env python3
"""Step 1 of the `reports` pipeline: make the tenant's document.

A stand-in for "download the tenant's data": it writes a deterministic text about a topic, so the
same job always yields the same document (a retried step must be safe to run again).

Input (the job payload):
    {"topic": "solar power", "paragraphs": 3}
        topic       text, 1-80 characters (required)
        paragraphs  integer 1-50 (default 3)
        delay_ms    optional integer 0-10000: sleep this long first, like slow I/O
        flaky       optional integer 0-10: fail (retryably) on the first `flaky` attempts
        needs_file  optional path: fail for good while this file does not exist (the demo's
                    job to replay from the console once the file is there)

Output: {"tenant", "topic", "title", "paragraphs", "text", "doc_id"}

The step protocol (see docs/config.md): JSON on stdin, JSON on stdout, exit 0 = success,
exit 65 = permanent failure (the job goes to the dead-letter queue), any other exit = retry.
"""

import hashlib
import json
import os
import random
import sys
import time

from step_io import EX_TEMPFAIL, fail, read_object

WORDS = (
    "system data network energy market customer value service process growth cost risk "
    "design quality report team policy model demand supply price time region product plan "
    "study result change trend level share source order method impact signal budget"
).split()
LINKS = "and or but while because so although whereas since".split()
FILLER = "the a of in to for with on by from at this that its their more less".split()


def int_field(payload, key, default, lo, hi):
    value = payload.get(key, default)
    # bool is an int in Python; `true` is not a count.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        fail(f"`{key}` must be an integer from {lo} to {hi}, got {json.dumps(value)}")
    return value


def sentence(rng, topic):
    words = []
    for _ in range(rng.randint(6, 14)):
        pool = rng.choice((WORDS, WORDS, FILLER))
        words.append(rng.choice(pool))
    if rng.random() < 0.6:
        words.insert(rng.randrange(len(words) + 1), topic)
    if rng.random() < 0.3:
        words.insert(rng.randrange(1, len(words)), rng.choice(LINKS))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def main():
    payload = read_object()
    topic = payload.get("topic")
    if not isinstance(topic, str) or not 1 <= len(topic.strip()) <= 80:
        fail(f"`topic` must be text of 1-80 characters, got {json.dumps(topic)}")
    topic = " ".join(topic.lower().split())
    paragraphs = int_field(payload, "paragraphs", 3, 1, 50)
    delay_ms = int_field(payload, "delay_ms", 0, 0, 10_000)
    flaky = int_field(payload, "flaky", 0, 0, 10)

    tenant = os.environ.get("WARREN_TENANT", "local")
    attempt = int(os.environ.get("WARREN_ATTEMPT", "1"))

    time.sleep(delay_ms / 1000)
    needs_file = payload.get("needs_file")
    if isinstance(needs_file, str) and not os.path.exists(needs_file):
        fail(f"the source file {needs_file} is not there yet; create it, then replay the job")
    if attempt <= flaky:
        fail(f"simulated outage on attempt {attempt} of the first {flaky}", EX_TEMPFAIL)

    # Seeded by what the job asks for, not by time or attempt: a rerun gives the same document.
    seed = hashlib.sha256(f"{tenant}\0{topic}\0{paragraphs}".encode()).hexdigest()
    rng = random.Random(seed)
    text = "\n\n".join(
        " ".join(sentence(rng, topic) for _ in range(rng.randint(3, 6))) for _ in range(paragraphs)
    )
    json.dump(
        {
            "tenant": tenant,
            "topic": topic,
            "title": f"{topic.title()}: notes for {tenant}",
            "paragraphs": paragraphs,
            "text": text,
            # What a real step would use to make its side effect happen once: <job_id>/<step>.
            "doc_id": os.environ.get("WARREN_IDEMPOTENCY_KEY", f"local/{seed[:12]}"),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
