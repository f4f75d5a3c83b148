"""A 10,000-record hostile corpus mixed into good traffic: nothing stops the worker, nothing vanishes."""

from __future__ import annotations

import math
import random
import re
import struct
from collections import Counter, defaultdict
from typing import Any

import pytest
from faultlib import Population
from kafka_helpers import Collector

from pipeline.state.snapshot import read_changelog
from pipeline.topics import TopicRegistry

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(900)]

HOSTILE = 10_000
GROWING = 2_000  # page views with 2 KB URLs of one cookie: ~4 MB of events against a 256 KiB profile budget
MAX_PROFILE_BYTES = 262_144  # config/example/datasets.yaml limits


def event(eid: str, ids: dict[str, list[str]], ts: int, **payload: Any) -> dict[str, Any]:
    return {"eventId": eid, "timestamp": ts, "eventType": "pageView", "dataset": "web-events",
            "identityMap": {ns: [{"id": v} for v in vals] for ns, vals in ids.items()}, **payload}


class Corpus:
    """The hostile records, each keyed `hostile-<n>` (so its dead letter can be found) and filed under its case."""

    def __init__(self, registry: TopicRegistry, pop: Population) -> None:
        self.registry, self.tag, self.now = registry, pop.tag, pop.now_ms
        self.rng = random.Random(pop.seed)
        self.items: list[tuple[str, bytes, bytes | None]] = []
        self.case: dict[str, str] = {}  # key -> case
        self.event_of: dict[str, str] = {}  # key -> event id, for records that may be applied
        self.growing = f"{self.tag}-growing"
        self.personal: list[str] = []  # e-mails, phones and CRM ids the hostile records carry

    def add(self, case: str, value: bytes | None, eid: str | None = None, logical: str = "ingest.events") -> None:
        key = f"hostile-{len(self.items)}"
        self.items.append((self.registry.name(logical), key.encode(), value))
        self.case[key] = case
        if eid is not None:
            self.event_of[key] = eid

    def enc(self, value: dict[str, Any], logical: str = "ingest.events") -> bytes:
        return self.registry[logical].codec.encode(value)

    def build(self) -> list[tuple[str, bytes, bytes | None]]:
        t, rng = self.tag, self.rng
        for n in range(GROWING):  # one visitor (a bot) whose profile would grow without end
            url = f"https://shop.example/{n}/" + "p" * 2000
            self.add("growing-profile", self.enc(event(f"{t}-g{n}", {"ECID": [self.growing]}, self.now - 3_600_000 + n,
                                                       web={"page": {"name": "p", "url": url}})), f"{t}-g{n}")
        cases = [self.invalid_utf8, self.truncated, self.unknown_schema, self.junk_bytes, self.blank_identities,
                 self.junk_identity_values, self.nan_values, self.oversized, self.too_many_identities,
                 self.huge_identity, self.null_value, self.two_crm_ids, self.bad_timestamp, self.unknown_dataset]
        each = (HOSTILE - GROWING) // len(cases)
        for i, case in enumerate(cases):
            for n in range(each if i < len(cases) - 1 else HOSTILE - GROWING - each * (len(cases) - 1)):
                case(n)
        rng.shuffle(self.items)
        return self.items

    def ts(self) -> int:
        return self.now - self.rng.randint(3_600_000, 7_200_000)

    def invalid_utf8(self, n: int) -> None:
        raw = self.enc(event("Z" * 12, {"ECID": [f"{self.tag}-u{n}"]}, self.ts()))
        self.add("invalid-utf8", raw.replace(b"Z" * 12, b"\xff\xfe\xc3\x28" * 3, 1))

    def truncated(self, n: int) -> None:
        raw = self.enc(event(f"{self.tag}-t{n}", {"ECID": [f"{self.tag}-t{n}"]}, self.ts(),
                             product={"sku": "s", "name": "n", "category": "shoes", "price": 10.0}))
        self.add("truncated-avro", raw[:self.rng.randint(6, len(raw) - 2)], f"{self.tag}-t{n}")

    def unknown_schema(self, n: int) -> None:
        raw = self.enc(event(f"{self.tag}-s{n}", {"ECID": [f"{self.tag}-s{n}"]}, self.ts()))
        self.add("unknown-schema-id", b"\x00" + struct.pack(">I", 900_000 + n) + raw[5:], f"{self.tag}-s{n}")

    def junk_bytes(self, n: int) -> None:
        self.add("junk-bytes", self.rng.randbytes(self.rng.randint(1, 300)))

    def blank_identities(self, n: int) -> None:
        value = ("", " ", "\t \n")[n % 3]
        self.add("blank-identities", self.enc(event(f"{self.tag}-b{n}", {"ECID": [value], "Email": ["  "]}, self.ts())),
                 f"{self.tag}-b{n}")

    def junk_identity_values(self, n: int) -> None:
        value = ("null", "undefined", "None", "0")[n % 4]  # strings a broken tag sends for "no cookie"
        self.add("junk-identity-values", self.enc(event(f"{self.tag}-j{n}", {"ECID": [value]}, self.ts())),
                 f"{self.tag}-j{n}")

    def nan_values(self, n: int) -> None:
        email, phone, crm = f"{self.tag}.h{n}@example.com", f"+1212{2000000 + n:07d}", f"{self.tag}-HC{n}"
        self.personal += [email, phone, crm]
        ids = {"ECID": [f"{self.tag}-n{n}"], "Email": [email], "Phone": [phone], "CRMID": [crm]}
        self.add("nan-values", self.enc(event(
            f"{self.tag}-n{n}", ids, self.ts(), eventType="purchase",
            commerce={"order": {"id": "o", "total": math.nan, "currency": "EUR"}},
            product={"sku": "s", "name": "n", "category": "shoes", "price": math.inf},
            fields={"score": math.nan})), f"{self.tag}-n{n}")

    def oversized(self, n: int) -> None:
        blob = "x" * self.rng.randint(70_000, 300_000)
        self.add("oversized", self.enc(event(f"{self.tag}-o{n}", {"ECID": [f"{self.tag}-o{n}"]}, self.ts(),
                                             fields={"blob": blob})), f"{self.tag}-o{n}")

    def too_many_identities(self, n: int) -> None:
        ids = {"ECID": [f"{self.tag}-m{n}-{k}" for k in range(25 + n % 20)]}
        self.add("too-many-identities", self.enc(event(f"{self.tag}-m{n}", ids, self.ts())), f"{self.tag}-m{n}")

    def huge_identity(self, n: int) -> None:
        email = f"{self.tag}.x{n}" + "y" * 300 + "@example.com"
        self.personal.append(email)
        ids: dict[str, list[str]] = {"Email": [email]}
        if n % 2:  # with a usable cookie: applied without the huge value
            ids["ECID"] = [f"{self.tag}-hc{n}"]
        self.add("huge-identity", self.enc(event(f"{self.tag}-x{n}", ids, self.ts())), f"{self.tag}-x{n}")

    def null_value(self, n: int) -> None:
        self.add("null-value", None)

    def two_crm_ids(self, n: int) -> None:
        crms = [f"{self.tag}-HA{n}", f"{self.tag}-HB{n}"]
        self.personal += crms
        self.add("two-crm-ids", self.enc(event(f"{self.tag}-2c{n}", {"CRMID": crms}, self.ts())), f"{self.tag}-2c{n}")

    def bad_timestamp(self, n: int) -> None:
        ts = -1000 - n if n % 2 else self.now + 10 * 86_400_000
        self.add("bad-timestamp", self.enc(event(f"{self.tag}-ts{n}", {"ECID": [f"{self.tag}-ts{n}"]}, ts)),
                 f"{self.tag}-ts{n}")

    def unknown_dataset(self, n: int) -> None:
        rec = {"recordId": f"{self.tag}-d{n}", "timestamp": self.ts(), "dataset": "no-such-dataset",
               "crmId": f"{self.tag}-HD{n}", "attributes": {f"rec.{self.tag}-d{n}": "applied"}}
        self.personal.append(f"{self.tag}-HD{n}")
        self.add("unknown-dataset", self.enc(rec, "ingest.profiles"), logical="ingest.profiles")


def test_a_hostile_corpus_never_stops_the_worker_and_nothing_vanishes(scenario, registry, kafka_bootstrap) -> None:
    # Given one worker, 300 generated people (about 2,900 good records) and 10,000 hostile records mixed in at
    # random: invalid UTF-8, truncated Avro, unknown schema ids, junk bytes, blank and junk identities, NaN
    # values, records over 64 KiB, 25+ identities, identities over 256 characters, null values, two CRM ids,
    # timestamps out of range, unknown datasets, and one cookie whose profile would grow without end
    corpora: list[Corpus] = []

    def noise(pop: Population) -> list[tuple[str, bytes, bytes | None]]:
        corpora.append(Corpus(registry, pop))
        return corpora[0].build()

    dlq = Collector(registry, kafka_bootstrap, "ingest.dlq")
    internal = Collector(registry, kafka_bootstrap, "internal.dlq")
    s = scenario("hostile-10k", people=300, rate=300, noise=noise)
    corpus = corpora[0]
    s.inject(f"{HOSTILE} hostile records among {len(s.good)} good ones")
    # When all of it is fed at 300 records/s
    s.begin()
    report = s.finish(quiesce_s=240, converge_s=60)
    try:
        dlq.settle(quiet_s=3, timeout_s=120)
        internal.settle(quiet_s=3, timeout_s=30)
        assert s.snap is not None
        # Then every hostile record is dead-lettered with a reason, or applied (its event is in a profile)
        stored_events = {e.event_id for p in s.snap.profiles.values() for e in p.events}
        reasons = {m["key"]: m.get("headers", {}).get("reason") for m in dlq.messages}
        table: dict[str, Counter[str]] = defaultdict(Counter)
        vanished: list[str] = []
        for key, case in corpus.case.items():
            if case == "growing-profile":
                continue
            if key in reasons:
                table[case][f"dlq:{reasons[key]}"] += 1
            elif corpus.event_of.get(key) in stored_events:
                table[case]["applied"] += 1
            else:
                table[case]["vanished"] += 1
                vanished.append(f"{key} ({case})")
        for case, outcomes in sorted(table.items()):
            print(f"  {case}: {dict(outcomes)}", flush=True)
        no_reason = [m for m in dlq.messages + internal.messages if not m.get("headers", {}).get("reason")]
        internal_reasons = Counter(m.get("headers", {}).get("reason") for m in internal.messages)
        # ... the growing profile keeps its newest events within its byte budget
        owner = s.snap.owner(f"ECID:{corpus.growing}")
        raw = read_changelog(registry, kafka_bootstrap, "state.profiles-changelog").get((owner or "").encode())
        kept = list(s.snap.profiles[owner].events) if owner in s.snap.profiles else []
        # ... and no e-mail, phone or CRM id appears in any worker log
        pattern = re.compile("|".join(re.escape(v) for v in corpus.personal + [
            i.id for c in s.expected.components for i in c if i.namespace in ("CRMID", "Email")]))  # type: ignore[union-attr]
        leaks = [f"{w.log_path.name}: {m.group(0)[:40]}" for w in s.fleet.everyone for m in [pattern.search(w.log())] if m]
        print(f"FAULTS hostile-10k corpus: vanished={len(vanished)} dead-lettered={len(dlq.messages)} "
              f"internal.dlq={len(internal.messages)} {dict(internal_reasons)} without reason={len(no_reason)}; "
              f"growing profile {len(raw or b'')} bytes (budget {MAX_PROFILE_BYTES}), {len(kept)} of {GROWING} page "
              f"views kept, newest kept {bool(kept) and kept[-1].event_id == f'{corpus.tag}-g{GROWING - 1}'}; "
              f"personal values in logs: {len(leaks)}", flush=True)
        s.check()
        assert not vanished, vanished[:10]
        assert not no_reason, no_reason[:3]
        assert raw is not None and len(raw) <= MAX_PROFILE_BYTES, (owner, len(raw or b""))
        assert kept and kept[-1].event_id == f"{corpus.tag}-g{GROWING - 1}"
        assert not leaks, leaks[:10]
        assert report.crashes == 0
    finally:
        dlq.close()
        internal.close()
