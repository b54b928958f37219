#!/usr/bin/env python3
"""The steps of the nightly example, one sub-command each (examples/nightly/warren.toml):

    plan TENANTS_FILE    the fan-out: one part per `part_size` items of each tenant
    fetch TENANTS_FILE   a part's records (made up here: a stand-in for the tenant's database)
    transform            checks and prices each record; a record without a price fails the part
    store                "writes" the rows; its output is what the join sees of the part
    notify TENANTS_FILE  the join: a summary per tenant, from every part's status and output

Step protocol (docs/config.md): JSON on stdin, JSON on stdout, exit 0 = success, exit 65 =
permanent failure (no retry: the part fails and the join reports it), any other exit = retry.
"""

import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "steps"))
from step_io import fail, read_object  # noqa: E402  (examples/steps/step_io.py)


def load_tenants(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)["tenants"]


def plan(tenants_file):
    """Input: the schedule's payload ({"part_size", "schedule", "slot"}). Output: the parts."""
    job = read_object()
    size = job.get("part_size", 50)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        fail(f"`part_size` must be a positive integer, got {json.dumps(size)}")
    parts = []
    for tenant in load_tenants(tenants_file):
        count = -(-tenant["items"] // size)  # ceiling: a tenant of 230 items is 5 parts of 50
        for k in range(count):
            offset = k * size
            payload = {
                "slot": job.get("slot"),
                "part": k + 1,
                "parts": count,
                "offset": offset,
                "count": min(size, tenant["items"] - offset),
            }
            # Each part is a job of `tenant-sync` on its own tenant's lane.
            parts.append({"tenant": tenant["id"], "payload": payload})
    return parts


def fetch(tenants_file):
    """Input: a part. Output: the part with its records."""
    part = read_object()
    tenant_id = os.environ["WARREN_TENANT"]
    tenant = next((t for t in load_tenants(tenants_file) if t["id"] == tenant_id), None)
    if tenant is None:
        fail(f"no tenant {tenant_id} in {tenants_file}")
    corrupt = set(tenant.get("corrupt", []))
    records = []
    for i in range(part["offset"], part["offset"] + part["count"]):
        # Deterministic: a retried fetch returns the same records.
        h = int(hashlib.sha256(f"{tenant_id}/{i}".encode()).hexdigest(), 16)
        record = {"id": f"{tenant_id}-{i:04d}", "qty": 1 + h % 9, "price_cents": 100 + h % 4900}
        if i in corrupt:
            del record["price_cents"]
        records.append(record)
    return {**part, "records": records}


def transform(_=None):
    """Input: fetch's output. Output: priced rows. A record without a price fails the part."""
    part = read_object()
    rows = []
    for r in part["records"]:
        price = r.get("price_cents")
        if not isinstance(price, int):
            fail(f"record {r['id']} has no price (part {part['part']} of {part['parts']})")
        rows.append({"id": r["id"], "total_cents": r["qty"] * price})
    return {k: part[k] for k in ("slot", "part", "parts")} | {"rows": rows}


def store(_=None):
    """Input: transform's output. Output: what the join sees of the part.

    A real store writes the rows keyed by WARREN_IDEMPOTENCY_KEY, so a repeat after a crash
    writes nothing twice."""
    part = read_object()
    return {
        "part": part["part"],
        "parts": part["parts"],
        "items": len(part["rows"]),
        "total_cents": sum(r["total_cents"] for r in part["rows"]),
    }


def notify(tenants_file):
    """Input: the join's ({"input", "total", "succeeded", "failed", "parts"}). Output: the
    summary per tenant, and as text in `report`."""
    join = read_object()
    tenants = {
        t["id"]: {"items": t["items"], "stored": 0, "parts": 0, "ok": 0, "failed": 0, "errors": []}
        for t in load_tenants(tenants_file)
    }
    for p in join["parts"]:
        t = tenants.setdefault(
            p["tenant"], {"items": 0, "stored": 0, "parts": 0, "ok": 0, "failed": 0, "errors": []}
        )
        t["parts"] += 1
        if p["status"] == "succeeded":
            t["ok"] += 1
            t["stored"] += (p.get("output") or {}).get("items", 0)
        else:
            t["failed"] += 1
            # "permanent failure: exit 65: <the tail of the step's stderr>": its last line says why.
            lines = (p.get("error") or "failed").strip().splitlines() or ["failed"]
            t["errors"].append(re.sub(r"^.*?exit \d+: ", "", lines[-1]))
    items = sum(t["items"] for t in tenants.values())
    summary = (
        f"{len(tenants)} tenants, {items} items, "
        f"{join['succeeded']} of {join['total']} parts ok, {join['failed']} failed"
    )
    slot = (join.get("input") or {}).get("slot", "?")
    lines = [f"nightly run of {slot}", f"  {'tenant':<14}{'items':>6}{'stored':>8}{'parts':>7}"]
    for name, t in tenants.items():
        line = f"  {name:<14}{t['items']:>6}{t['stored']:>8}{t['ok']:>5}/{t['parts']}"
        if t["errors"]:
            line += "  failed: " + "; ".join(t["errors"])
        lines.append(line)
    lines.append(summary)
    return {"slot": slot, "tenants": tenants, "summary": summary, "report": "\n".join(lines)}


STEPS = {"plan": plan, "fetch": fetch, "transform": transform, "store": store, "notify": notify}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STEPS:
        fail(f"usage: nightly.py {{{','.join(STEPS)}}} [TENANTS_FILE]")
    json.dump(STEPS[sys.argv[1]](*sys.argv[2:3]), sys.stdout)
