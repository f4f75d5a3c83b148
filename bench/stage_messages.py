"""Stage messages on the per-event path, typed (pipeline.stages.messages) against the dicts they replaced.

1. Micro-benchmark, one process: build, encode, decode and dispatch a mix of stage messages (the share of each
   operation a stitching run handles), as plain dicts with msgpack and a string dispatch (the previous path) and
   as msgspec Structs with a `match` (this one); in-process delivery only builds and dispatches.
2. The handler path: the real stitching handlers over a few thousand generated records (tests/identity/
   stitch_sim.py, one worker, no crash: every message is encoded and decoded as through Kafka), run against two
   checkouts alternately (`--tree OLD --tree NEW`).

Run: `python -m bench.stage_messages [--tree /path/to/old --tree /path/to/new]` (a quiet machine: it times).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack

from pipeline.stages import messages as m

EVENT = {"ts": 1_700_000_000_123, "ds": "web-events", "ids": [["ECID", "c-8a7f3b2e"], ["Email", "ann@example.com"]],
         "pri": ["ECID", "c-8a7f3b2e"], "k": "e", "id": "ev-0001", "t": "commerce.productViewed",
         "f": {"page": "/p/123", "price": 19.9, "currency": "EUR"}}
PID, OTHER = "018bcfe5683a1b2c3d4e5f", "018bcfe5684b9e8d7c6b5a"
# (weight, dict as the stages wrote it): about the mix of a stitching run's handled messages
MIX: list[tuple[int, dict[str, Any]]] = [
    (8, {"op": "apply", "pid": PID, "rec": EVENT, "home": "ECID:c-8a7f3b2e", "hop": False}),
    (2, {"op": "resolve", "rec": EVENT, "cand": PID}),
    (4, {"op": "claim", "pid": PID, "ts": 1_700_000_000_123}),
    (4, {"op": "claimed", "pid": PID, "claimant": PID, "key": "Email:ann@example.com"}),
    (3, {"op": "taken", "pid": PID, "claimant": PID, "key": "Email:ann@example.com", "owner": OTHER}),
    (3, {"op": "link", "pid": OTHER, "from": PID, "uniq": {"CRMID": ["C-1"]}, "via": "Email:ann@example.com"}),
    (4, {"op": "repoint", "from": OTHER, "to": PID, "adopt": False}),
    (2, {"op": "accepted", "pid": OTHER, "token": f"{OTHER}/3", "by": PID}),
    (1, {"op": "tick", "pid": PID}),
]
DICTS = [d for w, d in MIX for _ in range(w)]


def _dispatch_dict(handlers: dict[str, Callable[[dict[str, Any]], Any]], msg: dict[str, Any]) -> Any:
    return handlers[msg["op"]](msg)


def _dispatch_typed(msg: m.StageMessage) -> Any:
    return TYPED_HANDLERS[type(msg)](msg)


TYPED_HANDLERS: dict[type, Callable[[Any], Any]] = {
    m.Apply: lambda t: t.rec, m.Resolve: lambda t: t.rec, m.Claim: lambda t: t.pid, m.Claimed: lambda t: t.key,
    m.Taken: lambda t: t.owner, m.Link: lambda t: t.via, m.Repoint: lambda t: t.new, m.Accepted: lambda t: t.by,
    m.Tick: lambda t: t.pid}
HANDLERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "apply": lambda d: d["rec"], "resolve": lambda d: d["rec"], "claim": lambda d: d["pid"],
    "claimed": lambda d: d["key"], "taken": lambda d: d["owner"], "link": lambda d: d.get("via"),
    "repoint": lambda d: d["to"], "accepted": lambda d: d["by"], "tick": lambda d: d["pid"]}


REC_WIRE = m.from_stored({"op": "resolve", "rec": EVENT, "cand": PID}).rec  # type: ignore[union-attr]
TS, KEY, TOKEN = 1_700_000_000_123, "Email:ann@example.com", f"{OTHER}/3"
# How the handlers build each message of the mix, before (dict literals) and now (constructors)
BUILD_DICT: list[Callable[[], dict[str, Any]]] = [
    lambda: {"op": "apply", "pid": PID, "rec": EVENT, "home": "ECID:c-8a7f3b2e", "hop": False},
    lambda: {"op": "resolve", "rec": EVENT, "cand": PID},
    lambda: {"op": "claim", "pid": PID, "ts": TS},
    lambda: {"op": "claimed", "pid": PID, "claimant": PID, "key": KEY},
    lambda: {"op": "taken", "pid": PID, "claimant": PID, "key": KEY, "owner": OTHER},
    lambda: {"op": "link", "pid": OTHER, "from": PID, "uniq": {"CRMID": ["C-1"]}, "via": KEY},
    lambda: {"op": "repoint", "from": OTHER, "to": PID, "adopt": False},
    lambda: {"op": "accepted", "pid": OTHER, "token": TOKEN, "by": PID},
    lambda: {"op": "tick", "pid": PID}]
BUILD_TYPED: list[Callable[[], m.StageMessage]] = [
    lambda: m.Apply(pid=PID, rec=REC_WIRE, home="ECID:c-8a7f3b2e"),
    lambda: m.Resolve(rec=REC_WIRE, candidate=PID),
    lambda: m.Claim(pid=PID, ts=TS),
    lambda: m.Claimed(pid=PID, claimant=PID, key=KEY),
    lambda: m.Taken(pid=PID, claimant=PID, key=KEY, owner=OTHER),
    lambda: m.Link(pid=OTHER, sender=PID, uniq={"CRMID": ["C-1"]}, via=KEY),
    lambda: m.Repoint(old=OTHER, new=PID),
    lambda: m.Accepted(pid=OTHER, token=TOKEN, by=PID),
    lambda: m.Tick(pid=PID)]
WEIGHTS = [w for w, _ in MIX]
DICT_BUILDERS = [f for w, f in zip(WEIGHTS, BUILD_DICT, strict=True) for _ in range(w)]
TYPED_BUILDERS = [f for w, f in zip(WEIGHTS, BUILD_TYPED, strict=True) for _ in range(w)]


def micro(rounds: int = 9, n: int = 20_000) -> dict[str, float]:
    """Best CPU µs per message of each path over `rounds` runs (min: the least disturbed run)."""
    pack, unpack = msgpack.packb, msgpack.unpackb

    def kafka_dict() -> None:
        for build in DICT_BUILDERS:
            _dispatch_dict(HANDLERS, unpack(pack(build(), use_bin_type=True), raw=False))

    def kafka_typed() -> None:
        for build in TYPED_BUILDERS:
            _dispatch_typed(m.decode(m.encode(build())))

    def local_dict() -> None:
        for build in DICT_BUILDERS:
            _dispatch_dict(HANDLERS, build())

    def local_typed() -> None:
        for build in TYPED_BUILDERS:
            _dispatch_typed(build())

    out: dict[str, float] = {}
    for name, fn in (("kafka_dict", kafka_dict), ("kafka_typed", kafka_typed), ("local_dict", local_dict),
                     ("local_typed", local_typed)):
        reps = max(1, n // len(DICTS))
        best = float("inf")
        for _ in range(rounds):
            t0 = time.process_time()
            for _ in range(reps):
                fn()
            best = min(best, (time.process_time() - t0) / (reps * len(DICTS)) * 1e6)
        out[name] = round(best, 3)
    out["kafka_ratio_typed_over_dict"] = round(out["kafka_typed"] / out["kafka_dict"], 3)
    out["local_ratio_typed_over_dict"] = round(out["local_typed"] / out["local_dict"], 3)
    return out


SIM = """
import json, random, sys, time, logging
logging.disable(logging.CRITICAL)
sys.path[:0] = [{tree!r}, {tree!r} + "/tests", {tree!r} + "/tests/identity"]
from stitch_sim import StitchSim
from stitching import generate_world
from test_stitching_protocol import CONFIG
world = generate_world(random.Random(1), {people}, households=0.5, hostile=0.0)
t0 = time.process_time()  # CPU time: the machine is shared, and waiting for a core is not the code's cost
sim = StitchSim(CONFIG, workers=1, fast_path=True)
sim.run(world.records, random.Random(2), max_steps=5_000_000)
print(json.dumps({{"s": time.process_time() - t0, "records": len(world.records), "handled": sim.handled}}))
"""


def handler_path(trees: list[str], people: int = 400, rounds: int = 9) -> dict[str, Any]:
    """CPU seconds per run of the stitching handlers for each tree, alternating (the same machine noise for both)."""
    times: dict[str, list[float]] = {t: [] for t in trees}
    info: dict[str, Any] = {}
    for _ in range(rounds):
        for tree in trees:
            out = subprocess.run([sys.executable, "-c", SIM.format(tree=tree, people=people)], capture_output=True,
                                 text=True, check=True, env={**os.environ, "PYTHONPATH": tree}).stdout
            res = json.loads(out)
            times[tree].append(res["s"])
            info[tree] = {"records": res["records"], "handled": res["handled"]}
    summary = {t: {**info[t], "best_s": round(min(v), 3), "median_s": round(statistics.median(v), 3)}
               for t, v in times.items()}
    if len(trees) == 2:
        old, new = trees
        summary["ratio_new_over_old_best"] = round(min(times[new]) / min(times[old]), 3)
        summary["ratio_new_over_old_median"] = round(statistics.median(times[new]) / statistics.median(times[old]), 3)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], help="a checkout to run the handler path of (twice)")
    ap.add_argument("--people", type=int, default=400)
    args = ap.parse_args()
    result: dict[str, Any] = {"micro_us_per_message": micro()}
    if args.tree:
        result["handler_path"] = handler_path(args.tree, args.people)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
