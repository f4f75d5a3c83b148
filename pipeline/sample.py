"""A reproducible sample of online (web) and offline (CRM) data for a population of people.

Each person browses anonymously with a cookie (ECID); most log in at some point, which links the
cookie to their CRM id and e-mail; the CRM holds attribute records for most of them. Timestamps are
recent (relative to `now`) so windows like "within 24h" and "within 7d" select them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATEGORIES = ["shoes", "bags", "shirts", "watches", "jackets"]
CITIES = ["Lyon", "Paris", "Berlin", "Madrid", "Milan", "London"]
FIRST = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade"]


@dataclass(frozen=True)
class Person:
    n: int
    ecid: str
    crm_id: str | None
    email: str | None


def people(count: int, seed: int = 7) -> list[Person]:
    rnd = random.Random(seed)
    out = []
    for n in range(count):
        known = rnd.random() < 0.7
        out.append(Person(n, f"ecid-{seed}-{n:07d}", f"CRM{seed}{n:07d}" if known else None,
                          f"User.{n}@Example.com" if known else None))
    return out


def _event(p: Person, seq: int, ts: int, etype: str, **payload: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"eventId": f"ev-{p.n}-{seq}", "timestamp": ts, "eventType": etype,
                          "dataset": "web-events", "identityMap": {"ECID": [{"id": p.ecid, "primary": True}]}}
    ev.update(payload)
    return ev


def events_for(p: Person, rnd: random.Random, now_ms: int) -> Iterator[dict[str, Any]]:
    ts = now_ms - rnd.randint(1, 36) * 3600_000
    seq = 0
    fav = rnd.choice(CATEGORIES)
    for _ in range(rnd.randint(1, 8)):
        seq += 1
        ts += rnd.randint(5, 600) * 1000
        kind = rnd.random()
        cat = fav if rnd.random() < 0.7 else rnd.choice(CATEGORIES)
        product = {"sku": f"SKU-{cat[:3].upper()}-{rnd.randint(1, 50)}", "name": f"{cat} item",
                   "category": cat, "price": round(rnd.uniform(20, 400), 2)}
        if kind < 0.35:
            yield _event(p, seq, ts, "pageView", web={"page": {"name": "home", "url": "https://shop.example/"}})
        elif kind < 0.8:
            yield _event(p, seq, ts, "productView", product=product)
        elif kind < 0.92:
            yield _event(p, seq, ts, "cartAdd", product=product)
        else:
            yield _event(p, seq, ts, "purchase", commerce={"order": {
                "id": f"o-{p.n}-{seq}", "total": round(rnd.uniform(50, 900), 2), "currency": "EUR"}})
    if p.crm_id and rnd.random() < 0.85:
        seq += 1
        login = _event(p, seq, ts + 1000, "login")
        login["identityMap"] = {"ECID": [{"id": p.ecid}], "CRMID": [{"id": p.crm_id, "primary": True}],
                                "Email": [{"id": p.email}]}
        yield login


def crm_record(p: Person, rnd: random.Random, now_ms: int) -> dict[str, Any]:
    return {
        "recordId": f"crm-{p.n}", "timestamp": now_ms - rnd.randint(1, 30) * 86400_000, "dataset": "crm",
        "crmId": p.crm_id, "email": p.email,
        "person": {"firstName": rnd.choice(FIRST), "lastName": f"Doe{p.n}", "city": rnd.choice(CITIES),
                   "birthDate": f"{rnd.randint(1950, 2004)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}"},
        "loyalty": {"tier": rnd.choice(["gold", "silver", "bronze", "bronze"]), "points": rnd.randint(0, 20000)},
        "consents": {"email": rnd.choice(["yes", "yes", "no"]), "sms": rnd.choice(["yes", "no"])},
    }


def generate(count: int, now_ms: int, seed: int = 7) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(events, profile records) for `count` people, reproducible for a seed (timestamps follow now_ms)."""
    rnd = random.Random(seed + 1)
    events: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for p in people(count, seed):
        events.extend(events_for(p, rnd, now_ms))
        if p.crm_id and rnd.random() < 0.9:
            records.append(crm_record(p, rnd, now_ms))
    events.sort(key=lambda e: e["timestamp"])
    return events, records


def write(count: int, out_dir: Path, now_ms: int, seed: int = 7) -> tuple[Path, Path]:
    events, records = generate(count, now_ms, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev_path, rec_path = out_dir / "events.jsonl", out_dir / "profiles.jsonl"
    ev_path.write_text("".join(json.dumps(e) + "\n" for e in events))
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ev_path, rec_path
