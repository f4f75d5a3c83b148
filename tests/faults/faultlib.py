"""The fault suite's shared harness: generated people, a paced feed, the plain reference, worker fleet and the report."""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from identity.reference import reference_components
from kafka_helpers import Collector
from procs import wait_settled

from pipeline.ingest.agents import ingest_group
from pipeline.ingest.decode import Decoder, Rejected, Skipped
from pipeline.model import ExperienceEvent, Identity, ProfileRecord, ProfileState
from pipeline.profiles.merge import apply_event, apply_record
from pipeline.segments.reference import reference_evaluate
from pipeline.settings import PipelineConfig
from pipeline.stages.agents import stages_group
from pipeline.state.snapshot import GraphSnapshot, snapshot
from pipeline.topics import TopicRegistry

# Audiences whose outcome depends only on the data at test scale: counts, sums, attributes, segments of
# segments, and windows of 30 days over events 2-20 hours old (an abandonment's hour has always passed).
SEGMENTS = """
audiences:
  - {id: visitors, name: v, query: 'event pageView within 30d'}
  - {id: shoe-lovers, name: s, query: 'count(event productView where product.category = "shoes" within 30d) >= 3'}
  - {id: big-spenders, name: b, query: 'sum(commerce.order.total of event purchase within 30d) > 500'}
  - {id: cart-abandoners, name: c, query: 'event cartAdd within 30d not followed by purchase within 1h'}
  - {id: logged-in, name: l, query: 'event login within 30d'}
  - {id: gold, name: g, query: 'loyalty.tier = "gold"', attributes: [loyalty.tier]}
  - {id: silver-or-better, name: s, query: 'loyalty.tier in ["gold", "silver"]'}
  - {id: points-rich, name: p, query: 'loyalty.points >= 10000'}
  - {id: email-ok, name: e, query: 'consents.email = "yes"'}
  - {id: vip, name: v, query: 'inSegment("gold") and inSegment("big-spenders")'}
  - {id: anonymous-shoppers, name: a, query: 'not inSegment("silver-or-better") and event productView within 30d'}
"""

# Faust's group drops a SIGKILLed member that is not restarted after 10 s instead of 60 s.
FAST_FAILOVER = {"BROKER_SESSION_TIMEOUT": "10"}
WORKER_ENV = {"PIPELINE_STATIC_MEMBERSHIP": "1", "PIPELINE_WALK_PROCESSES": "0", **FAST_FAILOVER}
CATEGORIES = ("shoes", "bags", "shirts")
# A traceback: Python's own, or the frames the worker logs of an unexpected error (`pipeline.errors.where`):
# one block of consecutive `  File "...", line N, in f` lines (with their source lines) each.
FRAMES = re.compile(r'(?:^  File "[^\n]*", line \d+, in [^\n]*\n(?:^    [^\n]*\n)*)+', re.MULTILINE)
# The test's own clients log only critical errors: a broker outage would print ~20 lines/s per client.
QUIET = {"log_level": 2}


def seed_from_env() -> int:
    """FAULTS_SEED chooses the input; else a random one (printed in every report line)."""
    return int(os.environ.get("FAULTS_SEED") or random.randrange(1_000_000))


# ---------------------------------------------------------------- the input


@dataclass(frozen=True)
class Rec:
    """One ingest record of a generated person, as produced (logical topic, key, Avro dict)."""

    logical: str
    key: str
    value: dict[str, Any]
    rid: str
    person: int

    @property
    def is_event(self) -> bool:
        return self.logical == "ingest.events"


@dataclass
class Population:
    """People browsing with 1-2 cookies; 70 % known, with a CRM id and e-mail, 1-2 CRM records and logins that
    link some of their cookies. Records are in arrival order (people interleaved), each keyed by its home
    identity (the CRM id if it has one, else the cookie), as `pipeline produce` keys them."""

    seed: int
    tag: str
    people: int
    now_ms: int
    records: list[Rec] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"seed {self.seed}, {self.people} people, {len(self.records)} records, tag {self.tag}"


def generate(seed: int, people: int, now_ms: int | None = None) -> Population:
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    now = now_ms or int(time.time() * 1000)
    pop = Population(seed, tag, people, now)
    per_person: list[list[Rec]] = []
    for i in range(people):
        cookies = [f"{tag}-c{i}-{j}" for j in range(1 if rng.random() < 0.7 else 2)]
        known = rng.random() < 0.7
        crm, email = (f"{tag}-C{i}", f"{tag}.p{i}@example.com") if known else (None, None)
        recs: list[Rec] = []
        for j in range(rng.randint(3, 12)):
            cookie = rng.choice(cookies)
            ts = now - rng.randint(2 * 3600, 20 * 3600) * 1000
            etype = rng.choices(("pageView", "productView", "cartAdd", "purchase"), (30, 40, 15, 10))[0]
            ev: dict[str, Any] = {"eventId": f"{tag}-e{i}-{j}", "timestamp": ts, "eventType": etype,
                                  "dataset": "web-events", "identityMap": {"ECID": [{"id": cookie, "primary": True}]}}
            if etype == "pageView":
                ev["web"] = {"page": {"name": "home", "url": "https://shop.example/"}}
            elif etype in ("productView", "cartAdd"):
                cat = rng.choice(CATEGORIES)
                ev["product"] = {"sku": f"SKU-{cat}", "name": f"{cat} item", "category": cat,
                                 "price": float(rng.randint(20, 400))}
            else:
                ev["commerce"] = {"order": {"id": f"o{i}-{j}", "total": float(rng.randint(50, 450)),
                                            "currency": "EUR"}}
            recs.append(Rec("ingest.events", f"ECID:{cookie}", ev, ev["eventId"], i))
        if known:
            for j, cookie in enumerate(cookies):
                if rng.random() < 0.85:  # some cookies are never logged in on: a profile of their own
                    login: dict[str, Any] = {"eventId": f"{tag}-l{i}-{j}", "timestamp": now - rng.randint(2 * 3600, 20 * 3600) * 1000,
                             "eventType": "login", "dataset": "web-events",
                             "identityMap": {"ECID": [{"id": cookie}], "CRMID": [{"id": crm, "primary": True}],
                                             "Email": [{"id": email}]}}
                    recs.append(Rec("ingest.events", f"CRMID:{crm}", login, login["eventId"], i))
            for k in range(rng.randint(1, 2)):
                rid = f"{tag}-r{i}-{k}"
                rec = {"recordId": rid, "timestamp": now - (30 - k) * 3600_000, "dataset": "crm", "crmId": crm,
                       "email": email, "loyalty": {"tier": rng.choice(("gold", "silver", "bronze")),
                                                   "points": rng.randint(0, 20_000)},
                       "consents": {"email": rng.choice(("yes", "no"))},
                       "attributes": {f"rec.{rid}": "applied"}}  # proves this record reached the profile
                recs.append(Rec("ingest.profiles", f"CRMID:{crm}", rec, rid, i))
        rng.shuffle(recs)
        per_person.append(recs)
    # interleave people: each record of a person goes to a random slot, their relative order kept
    slots = [i for i, recs in enumerate(per_person) for _ in recs]
    rng.shuffle(slots)
    cursor = [0] * people
    for i in slots:
        pop.records.append(per_person[i][cursor[i]])
        cursor[i] += 1
    return pop


def encode(registry: TopicRegistry, recs: Iterable[Rec]) -> list[tuple[str, bytes, bytes | None]]:
    """(physical topic, key, value) per record, encoded with the topics' codecs."""
    return [(registry.name(r.logical), r.key.encode(), registry[r.logical].codec.encode(r.value)) for r in recs]


# ---------------------------------------------------------------- the plain reference


@dataclass
class Expected:
    """What an undisturbed pipeline ends with, from the plain references: who is who (connected components of
    the records' identities, tests/identity/reference.py) and each component's audiences (the reference
    evaluator over a profile holding all its records, pipeline/segments/reference.py). Records are decoded by
    the ingest decoder and applied by the pure profile updates, as the worker does; records the decoder
    rejects are left out (`rejected`)."""

    components: list[frozenset[Identity]]
    component_of: dict[str, int]  # identity key -> component index
    audiences: list[set[str]]  # per component
    events: dict[str, int]  # event id -> component
    records: dict[str, int]  # CRM record id -> component, for records that carry the `rec.<id>` marker
    rejected: int = 0

    @property
    def memberships(self) -> int:
        return sum(len(a) for a in self.audiences)

    def event_count(self, n: int) -> int:
        return sum(1 for c in self.events.values() if c == n)


def expected(items: Iterable[tuple[str, bytes | None]], config_dir: Path, registry: TopicRegistry,
             now_ms: int | None = None) -> Expected:
    """The reference over (logical topic, value bytes) in arrival order (the order does not change it)."""
    cfg = PipelineConfig.load(config_dir)
    decoders = {lg: Decoder(kind, registry[lg].codec, cfg.profile.identity, cfg.profile.datasets)  # type: ignore[arg-type]
                for lg, kind in (("ingest.events", "event"), ("ingest.profiles", "profile"))}
    decoded: list[ExperienceEvent | ProfileRecord] = []
    rejected = 0
    for logical, value in items:
        d = decoders[logical].decode(value)
        if isinstance(d, Rejected | Skipped):
            rejected += 1
        else:
            decoded.append(d)
    components = reference_components([d.identities for d in decoded], cfg.profile.identity)
    component_of = {i.key: n for n, c in enumerate(components) for i in c}
    profiles = [ProfileState(f"ref{n}", created_ms=0) for n in range(len(components))]
    events: dict[str, int] = {}
    records: dict[str, int] = {}
    for d in sorted(decoded, key=lambda d: d.timestamp_ms):
        n = component_of[d.identities[0].key]
        if isinstance(d, ExperienceEvent):
            apply_event(profiles[n], d, cfg.profile)
            events[d.event_id] = n
        else:
            apply_record(profiles[n], d, cfg.profile)
            if f"rec.{d.record_id}" in d.attributes:
                records[d.record_id] = n
    at = now_ms or int(time.time() * 1000)
    audiences = [{a for a, ok in reference_evaluate(cfg.audiences, p, at).items() if ok} for p in profiles]
    return Expected(components, component_of, audiences, events, records, rejected)


# ---------------------------------------------------------------- the stored side


@dataclass
class Stored:
    """A component's live profile as the pipeline stored it."""

    pid: str
    active: set[str]  # audiences whose stored membership is not exited
    events: set[str] | None  # event ids (None: only the count is known, from the API)
    event_count: int
    attributes: set[str]


@dataclass
class Live:
    """Per checked component, its one live profile (None: its identities are on several profiles or none),
    and the stitching problems found."""

    profiles: dict[int, Stored | None]
    problems: list[str] = field(default_factory=list)


def live_from_snapshot(exp: Expected, snap: GraphSnapshot) -> Live:
    """Every component, from the changelogs: the owner of all its identities in the identity table."""
    live = Live({})
    for n, comp in enumerate(exp.components):
        owners = {snap.owner(i.key) for i in comp}
        pid = next(iter(owners)) if len(owners) == 1 else None
        p = snap.profiles.get(pid or "")
        if p is None:
            live.profiles[n] = None
            live.problems.append(f"component {n} ({min(comp).key}): live profiles {sorted(map(str, owners))}")
            continue
        live.profiles[n] = Stored(p.profile_id, p.active_segments(), {e.event_id for e in p.events}, len(p.events),
                                  set(p.attributes))
    return live


def live_from_api(exp: Expected, url: str, sample: Iterable[int]) -> Live:
    """A sample of components, from one worker's API (it must hold every partition): the profile each of the
    component's identities resolves to (CRM ids and cookies), which must be the same one."""
    import httpx

    live = Live({})
    with httpx.Client(base_url=url, timeout=10) as http:
        for n in sample:
            comp = exp.components[n]
            seen: dict[str, dict[str, Any]] = {}
            for i in comp:
                if i.namespace in ("CRMID", "ECID"):
                    r = http.get("/profiles", params={"namespace": i.namespace, "id": i.id})
                    body = r.json() if r.status_code == 200 else {"profile_id": f"<{r.status_code}>"}
                    seen[body["profile_id"]] = body
            if len(seen) != 1 or next(iter(seen)).startswith("<"):
                live.profiles[n] = None
                live.problems.append(f"component {n} ({min(comp).key}): live profiles {sorted(seen)}")
                continue
            body = next(iter(seen.values()))
            live.profiles[n] = Stored(body["profile_id"], {a for a, m in body["memberships"].items()
                                                            if m["status"] != "exited"},
                                      None, body["event_count"], set(body["attributes"]))
    return live


# ---------------------------------------------------------------- the comparison


@dataclass
class Outcome:
    """Final memberships and stored profiles against the reference (see `compare`)."""

    expected: int = 0  # active memberships the reference has (in the checked components)
    messages: int = 0
    checked: int = 0  # components checked
    lost: int = 0  # expected active, but the person's live profile's last message is not active
    extra: int = 0  # active, but not expected (wrong audience, or a merged-away profile never exited)
    duplicated: int = 0  # messages whose idempotency key came before
    records_lost: int = 0  # events / CRM records not in their person's live profile
    state_lost: int = 0  # expected but not active in the stored profile (the state itself, not messages)
    state_extra: int = 0
    stitching: int = 0  # components without exactly one live profile
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.extra or self.records_lost or self.stitching)

    def note(self, text: str) -> None:
        if len(self.examples) < 12:
            self.examples.append(text)


def final_statuses(messages: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], str], dict[str, set[str]]]:
    """Last status per (profile id, audience) in topic order (one profile's messages share a partition), and
    the identity keys each profile's messages carried."""
    last: dict[tuple[str, str], str] = {}
    identities: dict[str, set[str]] = defaultdict(set)
    for m in sorted(messages, key=lambda m: (m["partition"], m["offset"])):
        v = m["value"]
        last[(v["profile_id"], v["audience_id"])] = v["status"]
        identities[v["profile_id"]].update(f"{ns}:{i}" for ns, ids in (v.get("identities") or {}).items()
                                           for i in ids)
    return last, identities


def compare(exp: Expected, messages: list[dict[str, Any]], live: Live) -> Outcome:
    """Per checked component (person): the last message of each of its live profile's audiences against the
    reference (lost), every other active membership of its profiles (extra: a wrong audience, or a profile
    merged away whose exit never came), the stored memberships (state), and its records (records lost).
    Profiles whose identities the reference does not know (hostile input) are not a person's."""
    checked = live.profiles
    out = Outcome(expected=sum(len(exp.audiences[n]) for n in checked), messages=len(messages),
                  checked=len(checked), stitching=len(live.problems))
    for p in live.problems[:4]:
        out.note(p)
    keys = Counter(m["value"]["idempotency_key"] for m in messages)
    out.duplicated = sum(n - 1 for n in keys.values())
    last, carried = final_statuses(messages)
    person_of: dict[str, int | None] = {}
    for pid, ids in carried.items():
        comps = {exp.component_of[k] for k in ids if k in exp.component_of}
        if len(comps) > 1:
            out.note(f"profile {pid}: its messages carry identities of {len(comps)} people")
        person_of[pid] = next(iter(comps)) if len(comps) == 1 else (None if comps else -1)
    for n, stored in checked.items():
        want = exp.audiences[n]
        live_pid = stored.pid if stored else None
        for aid in sorted(want):
            if live_pid is None or last.get((live_pid, aid)) != "realized":
                out.lost += 1
                out.note(f"lost: {min(exp.components[n]).key} {aid}: live profile {live_pid}, its last message "
                         f"{last.get((live_pid, aid)) if live_pid else None}")
        active = stored.active if stored else set()
        out.state_lost += len(want - active)
        out.state_extra += len(active - want)
    for (pid, aid), status in sorted(last.items()):
        person = person_of.get(pid)
        if status == "exited" or person == -1 or (person is not None and person not in checked):
            continue
        home = checked.get(person) if person is not None else None
        if person is None or home is None or pid != home.pid or aid not in exp.audiences[person]:
            out.extra += 1
            out.note(f"extra: profile {pid} {aid} (person {person}, live {home.pid if home else None})")
    # (a person not checked, or split over profiles (a stitching problem), has no records to check here)
    for eid, n in exp.events.items():
        home = checked.get(n)
        if home is not None and home.events is not None and eid not in home.events:
            out.records_lost += 1
            out.note(f"record lost: event {eid} not in {home.pid}")
    for n, stored in checked.items():
        if stored is not None and stored.events is None and stored.event_count < exp.event_count(n):
            out.records_lost += exp.event_count(n) - stored.event_count
            out.note(f"records lost: {stored.pid} has {stored.event_count} of {exp.event_count(n)} events")
    for rid, n in exp.records.items():
        home = checked.get(n)
        if home is not None and f"rec.{rid}" not in home.attributes:
            out.records_lost += 1
            out.note(f"record lost: CRM record {rid}")
    return out


# ---------------------------------------------------------------- the feed


class Feed:
    """Produces encoded records from a thread at `rate` records/s (a producer that buffers through a broker
    outage: nothing it was given fails). `sent` counts records handed to the producer, `acked` delivered ones."""

    def __init__(self, bootstrap: str, items: list[tuple[str, bytes, bytes | None]], rate: float) -> None:
        self.items, self.rate = items, rate
        self.producer: Producer | None = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                                  "enable.idempotence": True, "message.timeout.ms": 900_000,
                                  "queue.buffering.max.messages": 2_000_000, **QUIET})
        self.sent = self.acked = 0
        self.errors: list[str] = []
        self.started_at = self.finished_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.errors.append(str(err))

    def start(self) -> Feed:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = self.producer
        assert producer is not None
        t0 = time.monotonic()
        for n, (topic, key, value) in enumerate(self.items):
            if self._stop.is_set():
                return
            ahead = n / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)  # pacing the load, not waiting for an outcome
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=self._delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            self.sent += 1
            producer.poll(0)
        while self.acked + len(self.errors) < len(self.items) and not self._stop.is_set():
            producer.poll(0.1)
        self.finished_at = time.monotonic()

    @property
    def progress(self) -> float:
        return self.sent / max(1, len(self.items))

    def wait_sent(self, fraction: float, timeout_s: float = 600) -> None:
        """Until `fraction` of the records are handed to the producer."""
        deadline = time.monotonic() + timeout_s
        while self.progress < fraction:
            assert time.monotonic() < deadline, f"feed at {self.progress:.0%} after {timeout_s}s"
            time.sleep(0.05)

    def wait_done(self, timeout_s: float = 900) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"feed: {self.acked}/{len(self.items)} acknowledged after {timeout_s}s"
        assert not self.errors, f"{len(self.errors)} records not delivered, first: {self.errors[0]}"

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        if self.producer is not None:
            self.producer.flush(5)
            self.producer = None  # destroyed now, while the broker is up (not at exit, after it stopped)


# ---------------------------------------------------------------- lag and memory


class Lag:
    """Consumer lag of a worker deployment's two groups: the ingest group on the ingest topics, the stage
    consumers' group (`<app id>-stages`, not Faust's: Faust no longer consumes the stage topics) on the stage
    topics (committed offset vs end offset, summed)."""

    TOPICS = {"ingest": ("ingest.events", "ingest.profiles"), "stages": ("internal.identity", "internal.profile-ops")}

    def __init__(self, bootstrap: str, registry: TopicRegistry, app_id: str) -> None:
        self.consumers = {g: Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                                       **QUIET})
                          for g, group in (("ingest", ingest_group(app_id)), ("stages", stages_group(app_id)))}
        self.tps = {g: [TopicPartition(registry.name(t), p) for t in ts for p in range(registry[t].partitions)]
                    for g, ts in self.TOPICS.items()}
        self.samples: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> dict[str, int]:
        with self._lock:
            return self._sample()

    def _sample(self) -> dict[str, int]:
        out = {}
        for g, c in self.consumers.items():
            committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(self.tps[g], timeout=5)}
            lag = 0
            for tp in self.tps[g]:
                _lo, hi = c.get_watermark_offsets(tp, timeout=5, cached=False)
                lag += max(0, hi - max(committed.get((tp.topic, tp.partition), 0), 0))
            out[g] = lag
        return out

    def total(self) -> int | None:
        """The summed lag, None while the broker does not answer."""
        try:
            return sum(self.sample().values())
        except Exception:  # noqa: BLE001 - broker down or a request timed out: no sample
            return None

    def wait_below(self, limit: int, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> float | None:
        """Seconds until the lag is at most `limit` (None if it was not within timeout_s, or `give_up()`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s and not give_up():
            lag = self.total()
            if lag is not None and lag <= limit:
                return time.monotonic() - t0
            time.sleep(0.5)
        return None

    def start_sampling(self, period_s: float = 1.0) -> None:
        """Sample the total lag in a thread (`samples`: monotonic time, lag or None), for `caught_up`."""
        def run() -> None:
            while not self._stop.wait(period_s):
                self.samples.append((time.monotonic(), self.total()))
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def caught_up(self, since: float, limit: int) -> float | None:
        """Seconds from `since` to the first sample at or below `limit` (None: not yet)."""
        for t, lag in list(self.samples):
            if t >= since and lag is not None and lag <= limit:
                return t - since
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        for c in self.consumers.values():
            c.close()


class RssSampler:
    """Samples the resident memory of the processes `pids()` names every `period_s` in a thread."""

    def __init__(self, pids: Callable[[], list[int]], period_s: float = 1.0) -> None:
        self.pids, self.period_s = pids, period_s
        self.peak_mb = 0.0
        self.samples: list[tuple[float, float]] = []  # (monotonic time, summed RSS MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                rss = psutil.Process(pid).memory_info().rss / 2**20
                self.peak_mb = max(self.peak_mb, rss)
                total += rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append((time.monotonic(), self.rss_mb()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------- workers


class Fleet:
    """The scenario's workers by name: started, SIGKILLed, stopped and restarted (same name, static member),
    with the exits we caused, the times to ready after each (re)start, and crash detection."""

    def __init__(self, start_worker: Callable[..., Any], config_dir: Path, tmp_path: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self._start, self.config_dir, self.tmp_path = start_worker, config_dir, tmp_path
        self.env = {**WORKER_ENV, **(extra_env or {})}
        self.live: dict[str, Any] = {}
        self.everyone: list[Any] = []
        self.caused: set[int] = set()  # pids we SIGKILLed or SIGTERMed
        self.ready_s: list[float] = []  # (re)start -> ready, per start after the first ones
        self._empties = 0

    def start(self, name: str, empty_disk: bool = False, wait: bool = True) -> Any:
        data = self.tmp_path / (f"{name}-empty{self._empties}" if empty_disk else name)
        self._empties += empty_disk
        t0 = time.monotonic()
        w = self._start(name, config_dir=self.config_dir, wait=False, data_dir=data, extra_env=self.env)
        self.live[name] = w
        self.everyone.append(w)
        if wait:
            w.wait_ready(timeout_s=120)
            self.ready_s.append(time.monotonic() - t0)
        return w

    def kill(self, name: str) -> None:
        w = self.live.pop(name)
        self.caused.add(w.proc.pid)
        w.kill()

    def stop(self, name: str) -> int:
        w = self.live.pop(name)
        self.caused.add(w.proc.pid)
        return int(w.stop(timeout_s=60))

    def restart(self, name: str, empty_disk: bool = False) -> float:
        """SIGKILL, start again at once under the same name; returns the seconds to ready."""
        self.kill(name)
        self.start(name, empty_disk=empty_disk)
        return self.ready_s[-1]

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.live.values() if w.proc.poll() is None]

    def app_id(self) -> str:
        return str(next(iter(self.everyone)).env["PIPELINE_APP_ID"])

    def dead(self) -> bool:
        """True if a worker we did not stop exited (nothing will make progress on its partitions)."""
        return any(w.proc.poll() is not None for w in self.live.values())

    def check_alive(self) -> None:
        """Fails at once if a worker we did not stop exited."""
        for w in self.live.values():
            assert w.proc.poll() is None, f"worker {w.log_path.name} exited {w.proc.returncode}:\n{w.log()[-5000:]}"

    def crashes(self) -> tuple[int, int, list[str]]:
        """(exits we did not cause, tracebacks logged, the first lines of each) over every worker started."""
        exits = [w for w in self.everyone if w.proc.poll() is not None and w.proc.pid not in self.caused]
        lines: list[str] = [f"{w.log_path.name} exited {w.proc.returncode}" for w in exits]
        tracebacks = 0
        for w in self.everyone:
            blocks = FRAMES.findall(w.log())
            tracebacks += len(blocks)
            lines += [f"{w.log_path.name}: " + " | ".join(b.strip().splitlines()[-4:]) for b in blocks[:2]]
        return len(exits), tracebacks, lines


# ---------------------------------------------------------------- one scenario


@dataclass
class Report:
    """The figures a scenario prints: one line, `FAULTS <name>: ...`."""

    name: str
    faults: int = 0
    outcome: Outcome = field(default_factory=Outcome)
    exits: int = 0
    tracebacks: int = 0
    recover_s: list[float] = field(default_factory=list)  # restart -> ready
    caught_up_s: list[float] = field(default_factory=list)  # fault end -> lag back down
    peak_rss_mb: float = 0.0
    extra: str = ""

    @property
    def crashes(self) -> int:
        return self.exits + self.tracebacks

    def line(self) -> str:
        o = self.outcome

        def mx(xs: list[float]) -> str:
            return "-" if not xs else "never" if math.isinf(max(xs)) else f"{max(xs):.1f}s"
        return (f"FAULTS {self.name}: faults={self.faults} records_lost={o.records_lost} memberships "
                f"lost={o.lost} extra={o.extra} duplicated={o.duplicated} crashes={self.crashes} "
                f"recover_max={mx(self.recover_s)} caught_up_max={mx(self.caught_up_s)} "
                f"peak_rss={self.peak_rss_mb:.0f}MB | {o.checked} people checked, expected {o.expected} memberships, "
                f"{o.messages} messages, "
                f"stored state lost={o.state_lost} extra={o.state_extra}, stitching problems={o.stitching}"
                + (f"; {self.extra}" if self.extra else ""))


class Scenario:
    """A generated input fed to real workers while faults are injected, then compared with the reference.

    1. `begin`: workers started and ready, the feed started; 2. the test injects faults (`fleet`, `feed`,
    `lag`); 3. `finish`: feed delivered, lag zero, memberships settled, compared until right or a deadline,
    the report printed; 4. `check`: lost, extra, crashes and records lost are all zero."""

    def __init__(self, name: str, *, registry: TopicRegistry, bootstrap: str, start_worker: Callable[..., Any],
                 make_config: Callable[..., Path], tmp_path: Path, people: int, rate: float,
                 seed: int | None = None, extra_env: dict[str, str] | None = None,
                 noise: Callable[[Population], list[tuple[str, bytes, bytes | None]]] | None = None,
                 records: list[tuple[str, str, bytes, bytes | None]] | None = None) -> None:
        """`noise(population)`: more records (physical topic, key, value) mixed into the feed at random places,
        outside the reference (the hostile corpus). `records`: the input instead of generated people."""
        self.name, self.registry, self.bootstrap = name, registry, bootstrap
        self.seed = seed_from_env() if seed is None else seed
        self.config_dir = make_config(SEGMENTS)
        self.pop = generate(self.seed, people)
        self.fleet = Fleet(start_worker, self.config_dir, tmp_path, extra_env)
        self.good = encode(registry, self.pop.records)
        self.good_logical = [r.logical for r in self.pop.records]
        if records is not None:  # another generator's records (logical topic, physical topic, key, value)
            self.good = [(t, k, v) for _lg, t, k, v in records]
            self.good_logical = [lg for lg, _t, _k, _v in records]
        items: list[tuple[str, bytes, bytes | None]] = list(self.good)
        if noise is not None:
            extra = noise(self.pop)
            rng = random.Random(self.seed)
            slots = [True] * len(extra) + [False] * len(items)
            rng.shuffle(slots)
            good, bad = iter(items), iter(extra)
            items = [next(bad) if is_bad else next(good) for is_bad in slots]
        self.feed = Feed(bootstrap, items, rate)
        self.report = Report(name)
        self.memberships: Collector | None = None
        self.rss: RssSampler | None = None
        self.lag: Lag | None = None
        self.fault_ends: list[float] = []  # when each fault was over (caught-up times count from there)
        self.expected: Expected | None = None  # the reference and the stored graph `finish` compared
        self.snap: GraphSnapshot | None = None
        self.t0 = time.monotonic()

    def begin(self, workers: Iterable[str] = ("w1",)) -> Scenario:
        for name in workers:
            self.fleet.start(name, wait=False)
        for w in self.fleet.live.values():
            w.wait_ready(timeout_s=120)
        wait_settled(self.fleet.live.values(), timeout_s=120)
        self.fleet.ready_s.clear()
        self.memberships = Collector(self.registry, self.bootstrap, "activation.memberships", **QUIET)
        self.rss = RssSampler(self.fleet.pids)
        self.lag = Lag(self.bootstrap, self.registry, self.fleet.app_id())
        self.lag.start_sampling()
        self.feed.start()
        print(f"\n[{self.name}] {self.pop.label}; feeding at {self.feed.rate:.0f} records/s; topics "
              f"{self.registry.name('ingest.events')}, workers' logs in {self.fleet.tmp_path}", flush=True)
        return self

    def log(self, text: str) -> None:
        print(f"[{self.name} +{time.monotonic() - self.t0:.0f}s] {text}", flush=True)

    def inject(self, what: str) -> None:
        """Count and log one fault."""
        self.report.faults += 1
        self.log(what)

    def fault_over(self) -> None:
        self.fault_ends.append(time.monotonic())

    def sigkill_restart(self, name: str, empty_disk: bool = False) -> None:
        """SIGKILL a worker at the current point of the feed and start it again at once (static member)."""
        self.inject(f"SIGKILL {name} at {self.feed.progress:.0%} of the feed"
                    + (", restarted on an empty disk" if empty_disk else ""))
        ready = self.fleet.restart(name, empty_disk=empty_disk)
        self.fault_over()
        self.log(f"{name} ready {ready:.1f}s after its restart")

    def join(self, name: str) -> None:
        """A worker joins the group (a rebalance)."""
        self.inject(f"{name} joins at {self.feed.progress:.0%} of the feed")
        self.fleet.start(name)
        self.fault_over()

    def leave(self, name: str) -> None:
        """A worker leaves (SIGTERM, a rebalance); it must exit 0."""
        self.inject(f"{name} leaves (SIGTERM) at {self.feed.progress:.0%} of the feed")
        code = self.fleet.stop(name)
        self.fault_over()
        assert code == 0, f"{name} exited {code} on SIGTERM"

    def finish(self, quiesce_s: float = 180, converge_s: float = 60, sample: int | None = None) -> Report:
        """`sample`: check that many random people through the first worker's API instead of every person
        through the changelogs (a long run's changelogs are too big to read in a test)."""
        assert self.memberships is not None and self.lag is not None and self.rss is not None
        self.feed.wait_done()
        self.log(f"feed done: {self.feed.acked} records acknowledged")
        # quiescence: both groups caught up, then no new membership message for a few seconds
        waited = self.lag.wait_below(0, quiesce_s, self.fleet.dead)
        if waited is None:
            self.log("a worker died: not waiting for the lag" if self.fleet.dead() else
                     f"lag {self.lag.total()} after {quiesce_s:.0f}s")
        self.memberships.settle(quiet_s=4, timeout_s=60)
        # then compare until right or converge_s (a crash's consequences may still be in flight)
        deadline = time.monotonic() + converge_s
        exp = expected(((lg, v) for lg, (_t, _k, v) in zip(self.good_logical, self.good, strict=True)),
                       self.config_dir, self.registry)
        self.expected = exp
        chosen = random.Random(self.seed).sample(range(len(exp.components)), min(sample or 0, len(exp.components)))
        while True:
            self.memberships.poll(1)
            if sample is None:
                self.snap = snapshot(self.registry, self.bootstrap)
                live = live_from_snapshot(exp, self.snap)
            else:
                live = live_from_api(exp, next(iter(self.fleet.live.values())).url, chosen)
            out = compare(exp, self.memberships.messages, live)
            if out.clean or time.monotonic() > deadline or self.fleet.dead():
                break
            time.sleep(2)
        exits, tracebacks, lines = self.fleet.crashes()
        r = self.report
        limit = max(50, int(2 * self.feed.rate))
        # a fault whose lag never came back down counts as infinity ("never")
        r.caught_up_s += [c if (c := self.lag.caught_up(t, limit)) is not None else math.inf for t in self.fault_ends]
        r.outcome, r.exits, r.tracebacks = out, exits, tracebacks
        r.recover_s += self.fleet.ready_s
        r.peak_rss_mb = self.rss.peak_mb
        print(r.line() + f" ({self.pop.label}, test {time.monotonic() - self.t0:.0f}s)", flush=True)
        for e in out.examples + lines[:6]:
            print(f"  {e}", flush=True)
        return r

    def check(self) -> None:
        r = self.report
        o = r.outcome
        assert (o.lost, o.extra, o.records_lost, r.crashes) == (0, 0, 0, 0), r.line() + "\n" + "\n".join(o.examples)

    def close(self) -> None:
        """Idempotent: the fixture closes every scenario after its test."""
        self.feed.close()
        for c in (self.memberships, self.rss, self.lag):
            if c is not None:
                c.close()
        self.memberships = self.rss = self.lag = None


# ---------------------------------------------------------------- an HTTP destination


class Webhook:
    """A webhook receiver on its own thread and event loop: stores each batch's records (idempotency keys in
    arrival order), answers 503 in mode "503" and refuses connections (closed port) in mode "refuse"."""

    def __init__(self) -> None:
        import asyncio

        from aiohttp import web

        self.web = web
        self.loop = asyncio.new_event_loop()
        self.mode = "ok"
        self.keys: list[str] = []  # membership payloads stored, in order
        self.requests: Counter[str] = Counter()
        self.port = 0
        self._site: Any = None
        self._runner: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _handle(self, request: Any) -> Any:
        self.requests[self.mode] += 1
        if self.mode == "503":
            return self.web.Response(status=503, text="down")
        body = await request.json()
        self.keys.extend(r["idempotency_key"] for r in body["records"] if r.get("kind") == "membership")
        return self.web.json_response({"accepted": len(body["records"])})

    async def _start(self) -> None:
        if self._runner is None:
            app = self.web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = self.web.AppRunner(app, shutdown_timeout=0.1)
            await self._runner.setup()
        self._site = self.web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]

    async def _close_port(self) -> None:
        await self._site.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/audiences"

    def set(self, mode: str) -> None:
        """"ok", "503" or "refuse"."""
        if mode == "refuse" and self.mode != "refuse":
            self._call(self._close_port())
        elif mode != "refuse" and self.mode == "refuse":
            self._call(self._start())
        self.mode = mode

    def close(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
