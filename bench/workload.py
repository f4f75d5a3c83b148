"""The offered workload: a realistic mix of web events, logins, CRM records and ~1% malformed records.

Shapes follow pipeline/sample.py (people with an ECID cookie, 70% known with a CRM id and e-mail). Event
timestamps are the send time, so streaming windows hold and `emit - event time` is the pipeline's latency.

Encoding: the registry codec (fastavro.schemaless_writer) costs ~40 us per record here, which would make a
single Python producer the bottleneck above ~15k records/s on a 2-core box shared with broker and workers.
`FastAvro` writes the same Confluent-wire-format bytes by hand (schemas/ExperienceEvent.avsc and
ProfileRecord.avsc field order) and `FastAvro.self_check` proves byte equality with the registry codec at
start-up; `--codec-encode` uses the registry codec instead.
"""

from __future__ import annotations

import random
import struct
import time
from typing import Any

from pipeline.sample import CATEGORIES, CITIES, FIRST, Person, people

# the mix, as cumulative weights: (kind, weight)
MIX = [("pageView", 0.30), ("productView", 0.38), ("cartAdd", 0.12), ("purchase", 0.04), ("login", 0.06),
       ("crm", 0.09), ("malformed", 0.01)]

_DOUBLE = struct.Struct("<d")


_SMALL = [bytes(((n << 1) ^ (n >> 63),)) for n in range(64)]


def _long(n: int) -> bytes:
    if 0 <= n < 64:
        return _SMALL[n]
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_STR_CACHE: dict[str, bytes] = {}


def _str(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    return (_SMALL[n] if n < 64 else _long(n)) + b


def _const(s: str) -> bytes:
    """Encoded form of a string drawn from a small set (event types, namespaces, page names...)."""
    v = _STR_CACHE.get(s)
    if v is None:
        v = _STR_CACHE[s] = _str(s)
    return v


def _opt_str(s: str | None) -> bytes:
    return b"\x00" if s is None else b"\x02" + _str(s)


def _opt_double(d: float | None) -> bytes:
    return b"\x00" if d is None else b"\x02" + _DOUBLE.pack(d)


_IDMAP_CACHE: dict[tuple[tuple[str, str, bool], ...], bytes] = {}


def _identity_map(items: list[tuple[str, str, bool]]) -> bytes:
    key = tuple(items)
    v = _IDMAP_CACHE.get(key)
    if v is None:
        if len(_IDMAP_CACHE) > 400_000:
            _IDMAP_CACHE.clear()
        v = _IDMAP_CACHE[key] = _identity_map_uncached(items)
    return v


def _identity_map_uncached(items: list[tuple[str, str, bool]]) -> bytes:
    """map<string, array<IdentityItem>> in one block per namespace (order kept)."""
    if not items:
        return b"\x00"
    by_ns: dict[str, list[tuple[str, bool]]] = {}
    for ns, ident, primary in items:
        by_ns.setdefault(ns, []).append((ident, primary))
    out = _long(len(by_ns))
    for ns, vals in by_ns.items():
        out += _str(ns) + _long(len(vals))
        for ident, primary in vals:
            out += _str(ident) + (b"\x01" if primary else b"\x00") + _str("ambiguous")
        out += b"\x00"
    return out + b"\x00"


class FastAvro:
    """Byte-identical hand encoder for ExperienceEvent / ProfileRecord (Confluent wire format)."""

    def __init__(self, reg: Any) -> None:
        self.ev_codec = reg["ingest.events"].codec
        self.pr_codec = reg["ingest.profiles"].codec
        self.ev_head = self.ev_codec.header()
        self.pr_head = self.pr_codec.header()

    def event(self, ev: dict[str, Any]) -> bytes:
        ids = [(ns, i["id"], bool(i.get("primary"))) for ns, items in ev.get("identityMap", {}).items()
               for i in items]
        web = ev.get("web")
        product = ev.get("product")
        order = (ev.get("commerce") or {}).get("order") if ev.get("commerce") else None
        parts = [self.ev_head, _str(ev["eventId"]), _long(ev["timestamp"]), _const(ev["eventType"]),
                 _const(ev.get("dataset", "web-events")), _identity_map(ids), b"\x00"]  # ecid: null
        if web is None:
            parts.append(b"\x00")
        else:
            page = web.get("page")
            parts.append(b"\x02" + (b"\x00" if page is None else
                                    b"\x02\x02" + _const(page["name"]) + b"\x02" + _const(page["url"])))
        if product is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x02" + _opt_str(product.get("sku")) + b"\x02" + _const(product["name"])
                         + b"\x02" + _const(product["category"]) + _opt_double(product.get("price")))
        if ev.get("commerce") is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x02" + (b"\x00" if order is None else
                                    b"\x02" + _opt_str(order.get("id")) + _opt_double(order.get("total"))
                                    + b"\x02" + _const(order["currency"])))
        parts.append(b"\x00")  # fields: {}
        return b"".join(parts)

    def record(self, r: dict[str, Any]) -> bytes:
        p, lo, co = r["person"], r["loyalty"], r["consents"]
        return b"".join([
            self.pr_head, _str(r["recordId"]), _long(r["timestamp"]), _str(r["dataset"]), b"\x00",
            _opt_str(r.get("crmId")), _opt_str(r.get("email")), b"\x00",
            b"\x02" + _opt_str(p["firstName"]) + _opt_str(p["lastName"]) + _opt_str(p["birthDate"])
            + _opt_str(p["city"]),
            b"\x02" + _opt_str(lo["tier"]) + b"\x02" + _long(lo["points"]),
            b"\x02" + _opt_str(co["email"]) + _opt_str(co["sms"]),
            b"\x02" + _opt_str(r["crm"]["customerSince"]),
            b"\x00"])

    def self_check(self, gen: Workload, n: int = 400) -> None:
        """Every message kind encodes to exactly the registry codec's bytes."""
        seen = set()
        for _ in range(n):
            kind, _topic, _key, value = gen.next_record(int(time.time() * 1000), encode=False)
            if kind == "malformed":
                continue
            seen.add(kind)
            fast = self.record(value) if kind == "crm" else self.event(value)
            ref = (self.pr_codec if kind == "crm" else self.ev_codec).encode(value)
            if fast != ref:
                raise AssertionError(f"FastAvro differs from the registry codec for {kind}: {value}")
        if len(seen) < 6:
            raise AssertionError(f"self-check saw only {seen}")


class Workload:
    """Draws records from a population of `population` people; uniform over people, MIX over kinds."""

    def __init__(self, reg: Any, population: int = 50_000, seed: int = 11, codec_encode: bool = False,
                 run_tag: str = "") -> None:
        self.rnd = random.Random(seed)
        self.people: list[Person] = people(population, seed=7)
        self.fast = FastAvro(reg)
        self.codec_encode = codec_encode
        self.ev_topic, self.pr_topic = reg["ingest.events"].name, reg["ingest.profiles"].name
        self.seq = 0
        self.tag = run_tag
        self.fav = [CATEGORIES[hash((seed, n)) % len(CATEGORIES)] for n in range(population)]
        kinds, cum, acc = [], [], 0.0
        for k, w in MIX:
            acc += w
            kinds.append(k)
            cum.append(acc)
        self.kinds, self.cum = kinds, cum

    def _kind(self) -> str:
        x = self.rnd.random() * self.cum[-1]
        for k, c in zip(self.kinds, self.cum, strict=True):
            if x < c:
                return k
        return self.kinds[-1]

    def next_record(self, now_ms: int, encode: bool = True) -> tuple[str, str, bytes, Any]:
        """(kind, physical topic, key, value bytes or dict)."""
        rnd = self.rnd
        self.seq += 1
        kind = self._kind()
        p = self.people[rnd.randrange(len(self.people))]
        if kind == "malformed":
            return kind, (self.ev_topic if rnd.random() < 0.8 else self.pr_topic), b"junk-%d" % self.seq, \
                rnd.randbytes(rnd.randint(1, 200))
        if kind == "login" and p.crm_id is None:
            kind = "pageView"
        if kind == "crm":
            if p.crm_id is None:
                kind = "productView"
            else:
                rec = {"recordId": f"crm-{self.tag}{self.seq}", "timestamp": now_ms, "dataset": "crm",
                       "identityMap": {}, "ecid": None, "crmId": p.crm_id, "email": p.email, "phone": None,
                       "person": {"firstName": rnd.choice(FIRST), "lastName": f"Doe{p.n}",
                                  "birthDate": f"{1950 + p.n % 55}-{1 + p.n % 12:02d}-{1 + p.n % 28:02d}",
                                  "city": CITIES[p.n % len(CITIES)]},
                       "loyalty": {"tier": ("gold", "silver", "bronze", "bronze")[p.n % 4],
                                   "points": rnd.randint(0, 20000)},
                       "consents": {"email": ("yes", "yes", "no")[p.n % 3], "sms": ("yes", "no")[p.n % 2]},
                       "crm": {"customerSince": f"{2012 + p.n % 14}-0{1 + p.n % 9}-15"}, "attributes": {}}
                rec.pop("identityMap"), rec.pop("ecid"), rec.pop("phone"), rec.pop("attributes")
                if not encode:
                    return kind, self.pr_topic, rec["recordId"].encode(), rec
                v = self.fast.record(rec) if not self.codec_encode else self.fast.pr_codec.encode(rec)
                return kind, self.pr_topic, rec["recordId"].encode(), v
        ev: dict[str, Any] = {"eventId": f"ev-{self.tag}{self.seq}", "timestamp": now_ms, "eventType": kind,
                              "dataset": "web-events",
                              "identityMap": {"ECID": [{"id": p.ecid, "primary": True}]}}
        if kind == "login":
            ev["identityMap"] = {"ECID": [{"id": p.ecid}], "CRMID": [{"id": p.crm_id, "primary": True}],
                                 "Email": [{"id": p.email}]}
        elif kind == "pageView":
            page = ("checkout", "https://shop.example.com/checkout/step1") if rnd.random() < 0.1 else \
                ("home", "https://shop.example/")
            ev["web"] = {"page": {"name": page[0], "url": page[1]}}
        elif kind in ("productView", "cartAdd"):
            cat = self.fav[p.n] if rnd.random() < 0.7 else rnd.choice(CATEGORIES)
            ev["product"] = {"sku": f"SKU-{cat[:3].upper()}-{rnd.randint(1, 50)}", "name": f"{cat} item",
                             "category": cat, "price": round(rnd.uniform(20, 400), 2)}
        elif kind == "purchase":
            ev["commerce"] = {"order": {"id": f"o-{self.tag}{self.seq}", "total": round(rnd.uniform(50, 900), 2),
                                        "currency": "EUR"}}
        if not encode:
            return kind, self.ev_topic, ev["eventId"].encode(), ev
        v = self.fast.event(ev) if not self.codec_encode else self.fast.ev_codec.encode(ev)
        return kind, self.ev_topic, ev["eventId"].encode(), v


def producer_main(bootstrap: str, prefix: str, population: int, codec_encode: bool, cmd_q: Any, out_q: Any,
                  abort: Any) -> None:
    """The producer process: waits for ("step", rate, seconds) commands, offers records at that rate,
    answers with the step's stats; ("preload", topic, n) writes n plain events to a copy topic."""
    import psutil
    from confluent_kafka import Producer

    from pipeline.settings import load_topics

    reg = load_topics(prefix)
    gen = Workload(reg, population=population, codec_encode=codec_encode, run_tag=prefix)
    gen.fast.self_check(Workload(reg, population=population, seed=99))
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "enable.idempotence": True,
                  "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576,
                  "batch.num.messages": 10000})
    errors = [0]

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors[0] += 1

    me = psutil.Process()
    out_q.put(("ready", None))
    while True:
        cmd = cmd_q.get()
        if cmd[0] == "stop":
            p.flush(30)
            out_q.put(("stopped", None))
            return
        if cmd[0] == "preload":  # plain events (no CRM, no junk) for the passthrough ceiling
            _, topic, n = cmd
            sent = 0
            t0 = time.monotonic()
            while sent < n:
                kind, _t, key, value = gen.next_record(int(time.time() * 1000))
                if kind in ("crm", "malformed"):
                    continue
                try:
                    p.produce(topic, key=key, value=value, on_delivery=on_delivery)
                    sent += 1
                except BufferError:
                    p.poll(0.05)
                if sent % 1000 == 0:
                    p.poll(0)
            p.flush(60)
            out_q.put(("preloaded", {"n": sent, "seconds": time.monotonic() - t0, "errors": errors[0]}))
            continue
        _, rate, seconds = cmd
        abort.clear()
        counts: dict[str, int] = {}
        cpu0 = me.cpu_times()
        t0 = time.monotonic()
        sent = 0
        tick = 0.005
        while True:
            now = time.monotonic()
            el = now - t0
            if el >= seconds or abort.is_set():
                break
            target = int(rate * el)
            ms = int(time.time() * 1000)
            while sent < target:
                kind, topic, key, value = gen.next_record(ms)
                try:
                    p.produce(topic, key=key, value=value, on_delivery=on_delivery)
                except BufferError:
                    p.poll(0.01)
                    continue
                sent += 1
                counts[kind] = counts.get(kind, 0) + 1
                if sent & 511 == 0:
                    p.poll(0)
                    ms = int(time.time() * 1000)
            p.poll(0)
            rest = tick - (time.monotonic() - now)
            if rest > 0:
                time.sleep(rest)
        elapsed = time.monotonic() - t0
        p.flush(30)
        cpu1 = me.cpu_times()
        out_q.put(("step", {"rate": rate, "sent": sent, "seconds": elapsed, "achieved_rate": sent / elapsed,
                            "aborted": abort.is_set(), "counts": counts, "delivery_errors": errors[0],
                            "cpu_pct": 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed,
                            "rss_mb": me.memory_info().rss / 2**20}))
