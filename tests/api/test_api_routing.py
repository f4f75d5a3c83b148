"""Two running workers: any worker answers for any profile (lookups routed to the partition's owner), the
membership API and audience sizes summed over workers, refusals on the new endpoints, a dead owner is a 503,
and the latency of a routed lookup against a local one."""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka_helpers import produce, wait_group_stable
from procs import wait_settled

from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key

pytestmark = pytest.mark.integration

PEOPLE = 8  # even ones gold (members of gold-loyalty), odd ones silver
TS = 1_767_225_600_000  # the records' time: a membership's since_ms


def write_keys(path: Path, keys: dict[str, tuple[str, list[str]]]) -> None:
    path.write_text("keys:\n" + "".join(entry_yaml(ApiKey(i, hash_key(k), frozenset(s))) for i, (k, s) in keys.items()))


def hops(r: httpx.Response) -> int:
    return int(r.headers.get("X-CDP-Hops", "0"))


def p99_ms(http: httpx.Client, url: str, headers: dict[str, str], n: int = 200) -> tuple[float, float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        assert http.get(url, headers=headers).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(n * 0.99) - 1]


@pytest.mark.timeout(300)
def test_any_worker_answers_for_any_profile(registry: Any, kafka_bootstrap: str, start_worker: Any,
                                            tmp_path: Path) -> None:
    # Given two workers sharing the partitions, with a keys file: a profile reader, an audience reader, a scraper
    keys = {"reader": (new_key(), ["profiles:read"]), "aud": (new_key(), ["audiences:read"]),
            "scraper": (new_key(), ["metrics:read"])}
    path = tmp_path / "api-keys.yaml"
    write_keys(path, keys)
    env = {"PIPELINE_API_KEYS_FILE": str(path), "PIPELINE_API_FAILED_AUTH_BURST": "1000"}
    workers = [start_worker("w1", wait=False, extra_env=env), start_worker("w2", wait=False, extra_env=env)]
    for w in workers:
        w.wait_ready()
    wait_group_stable(kafka_bootstrap, workers[0].env["PIPELINE_APP_ID"], members=2)
    wait_settled(workers)
    reader, aud = {"X-API-Key": keys["reader"][0]}, {"X-API-Key": keys["aud"][0]}
    # and people known by CRM id and e-mail, every other one gold
    produce(registry, kafka_bootstrap, "ingest.profiles", [{
        "recordId": f"r{i}", "timestamp": TS, "dataset": "crm", "crmId": f"CRM-R{i}", "email": f"p{i}@route.example",
        "loyalty": {"tier": "gold" if i % 2 == 0 else "silver", "points": i}} for i in range(PEOPLE)])
    http = [httpx.Client(base_url=w.url, timeout=10) for w in workers]

    # When each worker is asked for each person by CRM id and by e-mail
    deadline = time.monotonic() + 90
    answers: dict[tuple[int, int, str], httpx.Response] = {}

    def expected_identities(i: int) -> dict[str, list[str]]:
        email = f"p{i}@route.example"
        return {"CRMID": [f"CRM-R{i}"], "Email": [email],
                "EMAIL_LC_SHA256": [hashlib.sha256(email.encode()).hexdigest()]}

    def same_body(i: int) -> bool:
        bodies = [answers[(i, k, ns)].json() for k in (0, 1) for ns in ("CRMID", "Email")]
        return all(b == bodies[0] for b in bodies)

    def settled(i: int) -> bool:
        # (an identity is claimed on its own partition before the profile lists it: a lookup by e-mail can find
        # the profile a moment before its identities include the e-mail)
        return same_body(i) and answers[(i, 0, "CRMID")].json()["identities"] == expected_identities(i)

    while time.monotonic() < deadline:
        answers = {(i, k, ns): http[k].get("/profiles", params={"namespace": ns, "id": value}, headers=reader)
                   for i in range(PEOPLE) for k in (0, 1)
                   for ns, value in (("CRMID", f"CRM-R{i}"), ("Email", f"p{i}@route.example"))}
        # (until the profiles are settled: a membership turns 'existing' when a later message evaluates it again)
        if all(r.status_code == 200 for r in answers.values()) and all(map(settled, range(PEOPLE))):
            break
        time.sleep(0.5)
    # Then every profile is found from either worker, with the same body
    assert {k: r.status_code for k, r in answers.items() if r.status_code != 200} == {}
    pids = []
    for i in range(PEOPLE):
        assert same_body(i), i
        bodies = [answers[(i, 0, "CRMID")].json()]
        assert bodies[0]["identities"] == expected_identities(i)
        pids.append(bodies[0]["profile_id"])
    # and by profile id: one worker answers itself, the other routes to it (one hop), the same body
    owner: dict[str, int] = {}
    for pid in pids:
        rs = [h.get(f"/profiles/{pid}", headers=reader) for h in http]
        assert rs[0].json() == rs[1].json() and rs[0].json()["profile_id"] == pid
        assert sorted(hops(r) for r in rs) == [0, 1], pid
        owner[pid] = [hops(r) for r in rs].index(0)
    assert set(owner.values()) == {0, 1}  # (8 profiles on 4 partitions: both workers hold some)
    # and an identity lookup takes at most two hops (the identity's owner, then the profile's)
    assert {hops(r) for r in answers.values()} <= {0, 1, 2} and max(hops(r) for r in answers.values()) >= 1
    # and POST /edge/evaluate is routed too (with its body)
    edge = [h.post("/edge/evaluate", json={"namespace": "CRMID", "id": "CRM-R1"}, headers=reader) for h in http]
    assert [r.status_code for r in edge] == [200, 200] and edge[0].json()["profile_id"] == edge[1].json()["profile_id"]

    # When the membership API is asked about a gold (member) and a silver (non-member) person, from both workers
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        size = [h.get("/audiences/gold-loyalty", headers=aud) for h in http]
        if all(r.status_code == 200 and r.json()["size"] == PEOPLE // 2 for r in size):
            break
        time.sleep(0.5)
    gold = http[0].get(f"/profiles/{pids[0]}", headers=reader).json()["memberships"]["gold-loyalty"]
    assert gold["status"] in ("realized", "existing")  # ('existing' once evaluated again: a silent change)
    for h in http:
        member = h.get("/audiences/gold-loyalty/members", params={"namespace": "Email", "id": "p0@route.example"},
                       headers=aud)
        other = h.get("/audiences/gold-loyalty/members", params={"namespace": "CRMID", "id": "CRM-R1"}, headers=aud)
        # Then the member's status, since when and why; the other is not a member
        assert member.json() == {"audience_id": "gold-loyalty", "profile_id": pids[0], "member": True,
                                 "status": gold["status"], "since_ms": TS, "reason": gold["reason"],
                                 "version": gold["version"]}
        assert other.json() == {"audience_id": "gold-loyalty", "profile_id": pids[1], "member": False,
                                "status": None, "since_ms": None, "reason": None, "version": None}
        # and an unknown audience or identity is a 404 problem
        for url, params in (("/audiences/nope/members", {"namespace": "CRMID", "id": "CRM-R1"}),
                            ("/audiences/gold-loyalty/members", {"namespace": "CRMID", "id": "CRM-NOBODY"}),
                            ("/audiences/nope", {})):
            r = h.get(url, params=params, headers=aud)
            assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", url
    # and the audience's size is the same from both workers: 4 members, counted over the 4 partitions
    assert [r.status_code for r in size] == [200, 200]
    assert size[0].json() == size[1].json()
    assert size[0].json()["size"] == PEOPLE // 2 and len(size[0].json()["partitions"]) == 4
    assert sum(size[0].json()["partitions"].values()) == PEOPLE // 2
    # and each gold member's entry is in the audience's flows, counted by the worker that published it, summed
    assert sum(f["entries"] for f in size[0].json()["flows"]) == PEOPLE // 2
    # When the console previews a query from either worker, Then every partition's stored profiles are counted
    for h in http:
        r = h.post("/audiences/validate", headers=aud, json={"id": "pts", "query": "loyalty.points >= 2", "preview": True})
        preview = r.json()["preview"]
        assert (preview["size"], preview["scanned"], preview["complete"]) == (PEOPLE - 2, PEOPLE, True), preview
        assert len(preview["partitions"]) == 4 and len(preview["sample"]) == min(10, PEOPLE - 2)

    # When the new endpoints are called without a key, with a wrong one, and with an under-scoped one
    for url in ("/audiences/gold-loyalty", "/audiences/gold-loyalty/members?namespace=CRMID&id=CRM-R1"):
        for headers, status in (({}, 401), ({"X-API-Key": new_key()}, 401), (reader, 403)):
            r = http[1].get(url, headers=headers)
            # Then 401, 401, 403 problems
            assert (r.status_code, r.headers["content-type"]) == (status, "application/problem+json"), (url, headers)

    # A request marked as routed to a worker that does not hold the key is refused (503), never sent on again
    pid = pids[0]
    stranger = http[1 - owner[pid]]
    r = stranger.get(f"/profiles/{pid}", headers={**reader, "X-CDP-Route": f"profile={pid}"})
    assert r.status_code == 503 and r.json()["type"].endswith(":not-owner") and r.headers["Retry-After"] == "1"
    r = stranger.get(f"/profiles/{pid}", headers={**reader, "X-CDP-Hops": "8"})
    assert r.status_code == 503 and r.json()["type"].endswith(":too-many-hops")

    # Latency: a routed lookup against a local one (the same profile, asked of its owner and of the other worker)
    local = p99_ms(http[owner[pid]], f"/profiles/{pid}", reader)
    routed = p99_ms(stranger, f"/profiles/{pid}", reader)
    print(f"GET /profiles/{{id}}: local p50 {local[0]:.2f} ms p99 {local[1]:.2f} ms; "
          f"routed p50 {routed[0]:.2f} ms p99 {routed[1]:.2f} ms")
    assert routed[1] < 1000

    # When the other worker dies (its partitions stay assigned to it until its session expires)
    dead = 1 - owner[pid]
    workers[owner[pid]].kill()
    # Then a lookup it held is a 503 with Retry-After from the live worker, never a 404
    r = http[dead].get(f"/profiles/{pid}", headers=reader)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    assert r.json()["type"].endswith(":owner-unreachable")
    r = http[dead].get("/audiences/gold-loyalty", headers=aud)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text

    # When it comes back (the same name and address: its partitions at once; a static member that rejoins keeps
    # the URL the group knew until the next rebalance), Then it counts its partitions' members again from its
    # store, and the size is whole again
    gone = workers[owner[pid]]
    start_worker(gone.name, extra_env={**env, "PIPELINE_WEB_PORT": str(gone.web_port)})
    again = httpx.Client(base_url=gone.url, timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        size = [h.get("/audiences/gold-loyalty", headers=aud) for h in (http[dead], again)]
        if [r.status_code for r in size] == [200, 200]:
            break
        time.sleep(0.5)
    assert [r.status_code for r in size] == [200, 200], [r.text for r in size]
    assert [r.json()["size"] for r in size] == [PEOPLE // 2] * 2
    for h in (*http, again):
        h.close()
