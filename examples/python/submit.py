#!/usr/bin/env python3
"""Submit a warren job from Python, with nothing but pika and msgpack, and wait for its result.

    pip install pika msgpack
    python3 examples/python/submit.py --config examples/warren.toml \\
        --tenant acme --payload '{"topic": "solar power", "paragraphs": 3}'

The wire format this follows is docs/wire-format.md. Without --config, give the pipeline's
shape by hand (--pipeline, --step, --shards, --pin); it must match the config the workers run,
or the job lands on the wrong shard queue (or is refused as unroutable).

Settings, strongest first: command-line flags, then WARREN_AMQP_URL / WARREN_NAMESPACE, then
the config file, then the defaults.

Prints the job id on stderr and, with --wait (the default), the job's output as JSON on stdout.
Exit status: 0 the job succeeded (or was submitted, with --no-wait), 1 it failed or could not be
submitted, 2 bad arguments, 3 no result before --timeout.
"""

import argparse
import datetime
import json
import os
import re
import sys
import time
import uuid

import msgpack
import pika
import pika.exceptions

FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PRIORITIES = ("high", "normal", "low")
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


# --- the shard function (docs/wire-format.md, "Shard"; common/src/shard.rs) -----------------

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & MASK64
    return h


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash, with the same float arithmetic as the Rust code."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_for(tenant: str, shards: int, pins: dict) -> int:
    """The shard queue of `tenant` among `shards`, honouring `pins` (tenant -> shard)."""
    if tenant in pins:
        return pins[tenant]
    shards = max(shards, 1)
    pinned = set(pins.values())
    candidates = [s for s in range(shards) if s not in pinned]
    h = fnv1a64(tenant.encode("utf-8"))
    if not candidates:
        return jump_hash(h, shards)
    return candidates[jump_hash(h, len(candidates))]


# --- the envelope -----------------------------------------------------------------------------


def uuid7() -> uuid.UUID:
    """A version 7 UUID: 48 bits of Unix milliseconds, then random bits, so ids sort by time.
    (Python 3.14 has uuid.uuid7(); warren accepts any UUID, but v7 keeps ids time-ordered.)"""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    return uuid.UUID(int=(ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)


def new_envelope(tenant, pipeline, first_step, priority, payload):
    now_ms = int(time.time() * 1000)
    return {
        "v": FORMAT_VERSION,
        "job_id": str(uuid7()),  # hyphenated text, not 16 raw bytes
        "tenant": tenant,
        "pipeline": pipeline,
        "step": first_step,
        "priority": priority,
        "attempt": 1,
        "input": payload,  # the first step's input is the job payload
        "submitted_at": now_ms,
        "published_at": now_ms,
    }


def encode(envelope) -> bytes:
    # A map keyed by field name; strings as MessagePack str (use_bin_type keeps bytes apart).
    return msgpack.packb(envelope, use_bin_type=True)


# --- publish and wait -------------------------------------------------------------------------


def submit(channel, namespace, envelope, shard):
    """Publishes the envelope to its step queue; returns once the broker has confirmed it.
    Raises pika.exceptions.UnroutableError when no queue matches (unknown pipeline or step, or
    the topology was never applied) and NackError when the broker refused it."""
    routing_key = f"{envelope['pipeline']}.{envelope['step']}.{envelope['priority']}.{shard}"
    channel.basic_publish(
        exchange=f"{namespace}.tasks",
        routing_key=routing_key,
        body=encode(envelope),
        properties=pika.BasicProperties(
            content_type="application/msgpack",
            delivery_mode=2,  # persistent
            message_id=envelope["job_id"],
            timestamp=int(time.time()),
        ),
        mandatory=True,  # unroutable -> returned to us, not dropped
    )
    return routing_key


def wait_for_result(channel, namespace, job_id, since_ms, timeout_s):
    """Reads the namespace's results stream from `since_ms` until the event of `job_id` shows up.
    Returns the decoded ResultEvent, or None on timeout."""
    channel.basic_qos(prefetch_count=100)  # a stream consumer must set a prefetch
    # A timestamp offset: the stream starts at about that time (whole chunks, so a few earlier
    # events may come too; hence the job_id filter). pika sends a datetime as an AMQP timestamp.
    offset = datetime.datetime.fromtimestamp(since_ms / 1000, tz=datetime.timezone.utc)
    deadline = time.monotonic() + timeout_s
    try:
        for method, _props, body in channel.consume(
            f"{namespace}.results",
            auto_ack=False,  # streams need manual acks; an ack only returns credit
            arguments={"x-stream-offset": offset},
            inactivity_timeout=1.0,
        ):
            if method is not None:
                channel.basic_ack(method.delivery_tag)
                try:
                    event = msgpack.unpackb(body, raw=False)
                except Exception:  # something else wrote to the stream; not ours
                    event = None
                if isinstance(event, dict) and event.get("job_id") == job_id:
                    return event
            if time.monotonic() > deadline:
                return None
    finally:
        channel.cancel()


# --- command line -----------------------------------------------------------------------------


def load_config(path):
    """Reads url, namespace and pipelines from a warren.toml (needs Python 3.11+ for tomllib)."""
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Submit a warren job and wait for its result.")
    p.add_argument("--config", help="warren.toml to read url, namespace, steps, shards, pins from")
    p.add_argument("--url", help=f"AMQP URL (env WARREN_AMQP_URL; default {DEFAULT_URL})")
    p.add_argument("--namespace", help="namespace (env WARREN_NAMESPACE; default warren)")
    p.add_argument("--pipeline", default="reports")
    p.add_argument("--step", help="the pipeline's first step (default: from --config)")
    p.add_argument("--shards", type=int, help="the pipeline's shards (default: from --config, else 4)")
    p.add_argument("--pin", action="append", default=[], metavar="TENANT=SHARD",
                   help="a pinned tenant, as in the pipeline's `pins` (repeatable)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--priority", default="normal", choices=PRIORITIES)
    p.add_argument("--payload", default="null", help="the job payload, JSON (default null)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the result")
    p.add_argument("--no-wait", action="store_true", help="submit only; do not wait")
    return p.parse_args(argv)


def settings(args):
    """Resolves every setting: flag > env > config file > default."""
    cfg = load_config(args.config) if args.config else {}
    broker = cfg.get("broker", {})
    url = args.url or os.environ.get("WARREN_AMQP_URL") or broker.get("url") or DEFAULT_URL
    namespace = args.namespace or os.environ.get("WARREN_NAMESPACE") or broker.get("namespace") or "warren"
    pipeline = next((p for p in cfg.get("pipelines", []) if p.get("name") == args.pipeline), {})
    if args.config and not pipeline:
        raise ValueError(f"pipeline {args.pipeline!r} is not in {args.config}")
    step = args.step or (pipeline["steps"][0]["name"] if pipeline else None)
    if not step:
        raise ValueError("give --step (the pipeline's first step) or --config")
    shards = args.shards or pipeline.get("shards", 4)
    pins = dict(pipeline.get("pins", {}))
    for pin in args.pin:
        tenant, _, shard = pin.partition("=")
        pins[tenant] = int(shard)
    for what, name in (("namespace", namespace), ("pipeline", args.pipeline), ("step", step),
                       ("tenant", args.tenant)):
        if not NAME_RE.match(name):
            raise ValueError(f"invalid {what} {name!r}: 1-64 characters of A-Z a-z 0-9 _ -")
    return url, namespace, step, shards, pins


def main(argv=None):
    args = parse_args(argv)
    try:
        url, namespace, step, shards, pins = settings(args)
        payload = json.loads(args.payload)
    except (ValueError, OSError, KeyError) as e:  # JSONDecodeError is a ValueError
        print(f"submit: {e}", file=sys.stderr)
        return 2

    envelope = new_envelope(args.tenant, args.pipeline, step, args.priority, payload)
    shard = shard_for(args.tenant, shards, pins)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now waits for the broker's ack
        try:
            routing_key = submit(channel, namespace, envelope, shard)
        except pika.exceptions.UnroutableError:
            print(f"submit: no queue for {namespace}.tasks / {envelope['pipeline']}."
                  f"{envelope['step']}.{envelope['priority']}.{shard}: unknown pipeline or step, "
                  "or the topology was not applied (warren topology apply)", file=sys.stderr)
            return 1
        except pika.exceptions.NackError:
            print("submit: the broker refused the job (nack)", file=sys.stderr)
            return 1
        job_id = envelope["job_id"]
        print(f"submitted {job_id} to {namespace}.q.{routing_key}", file=sys.stderr)
        if args.no_wait:
            return 0

        # Start reading 10 s before submission, as the Rust client does: clocks differ between
        # machines, and a job may have finished before we attach.
        since_ms = envelope["submitted_at"] - 10_000
        event = wait_for_result(channel, namespace, job_id, since_ms, args.timeout)
        if event is None:
            print(f"submit: no result for {job_id} within {args.timeout:g}s", file=sys.stderr)
            return 3
        took = (event.get("finished_at", 0) - event.get("submitted_at", 0)) / 1000
        print(f"{event['status']} after {took:.2f}s at step {event.get('step')} "
              f"(attempt {event.get('attempts')})", file=sys.stderr)
        if event["status"] != "succeeded":
            print(f"error: {event.get('error')}", file=sys.stderr)
            return 1
        json.dump(event.get("output"), sys.stdout, indent=2)
        print()
        return 0
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(main())
