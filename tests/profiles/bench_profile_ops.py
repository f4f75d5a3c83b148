"""Micro-benchmark of the per-event hot paths (not collected by pytest): python tests/profiles/bench_profile_ops.py."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.model import AttributeValue, ExperienceEvent, Identity, ProfileRecord, ProfileState
from pipeline.profiles.config import load_profile_config
from pipeline.profiles.merge import absorb, apply_event, apply_record
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.state.codec import decode_profile, encode_profile

EXAMPLE = EXAMPLE_CONFIG_DIR
CONFIG = load_profile_config(EXAMPLE / "identity.yaml", EXAMPLE / "datasets.yaml")
T0 = 1_700_000_000_000
IDS = (Identity("ECID", "e1"), Identity("Email", "a@b.c"))


def rate(n: int, fn: Callable[[], object]) -> float:
    """Operations per CPU second (CPU time, so other load on the machine does not skew it)."""
    start = time.process_time()
    for _ in range(n):
        fn()
    return n / (time.process_time() - start)


def event(i: int, pid: str = "") -> ExperienceEvent:
    return ExperienceEvent(f"{pid}ev{i}", T0 + i * 1000, "web.pageview", "web-events", IDS, IDS[0],
                           {"web.url": f"https://x/{i}", "commerce.total": 12.5, "n": i})


def profile(pid: str, offset: int) -> ProfileState:
    """A profile with 50 events and 30 attributes."""
    p = ProfileState(pid, 0)
    for i in range(50):
        apply_event(p, event(i * 7 + offset, pid), CONFIG)
    for i in range(30):
        p.attributes[f"person.attr{i}"] = AttributeValue(f"value{i}" if i % 2 else i * 1.5, "crm", T0 + i)
    return p


def main() -> None:
    events = iter([event(i) for i in range(200_000)])
    at_cap = ProfileState("p", 0)
    print(f"apply_event/s (history filling up to the 5000 cap and beyond): "
          f"{rate(200_000, lambda: apply_event(at_cap, next(events), CONFIG)):,.0f}")
    records = iter([ProfileRecord(f"r{i}", T0 + i, "crm", IDS, None, {f"a{j}": i for j in range(10)})
                    for i in range(50_000)])
    print(f"apply_record/s (10 attributes): {rate(50_000, lambda: apply_record(at_cap, next(records), CONFIG)):,.0f}")
    a, b = profile("a", 0), profile("b", 3)

    def one_absorb() -> None:
        survivor = ProfileState("a", 0, {k: dict(v) for k, v in a.identities.items()}, dict(a.attributes),
                                list(a.events))
        absorb(survivor, b, CONFIG)

    print(f"absorb/s (50+50 events, 30+30 attributes, incl. copying the survivor): {rate(20_000, one_absorb):,.0f}")
    data = encode_profile(a)
    print(f"profile size: {len(data)} bytes")
    print(f"encode/s: {rate(20_000, lambda: encode_profile(a)):,.0f}")
    print(f"decode/s: {rate(20_000, lambda: decode_profile(data)):,.0f}")
    print(f"encode+decode round trips/s: {rate(20_000, lambda: decode_profile(encode_profile(a))):,.0f}")


if __name__ == "__main__":
    main()
