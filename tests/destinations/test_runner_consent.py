"""Consent at activation in the DestinationRunner, on a real broker with Avro messages: a destination's rule is
checked on every membership change, a withdrawal exits that destination only, a re-grant enters it again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from dest_helpers import membership, profile_change
from http_receiver import Receiver
from kafka_helpers import produce

from pipeline.destinations.cli import registry_decoder
from pipeline.destinations.config import parse_destinations
from pipeline.destinations.runner import DestinationRunner, RunnerSettings
from pipeline.observability import metrics
from pipeline.topics import TopicRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MEMBERSHIPS = "activation.memberships"
PROFILE_CHANGES = "activation.profile-changes"


def destinations(url: str, suffix: str) -> str:
    """Two webhooks for vip: `mail-*` with a consent rule on consents.email, `open-*` without one."""
    common = ("    kind: http\n    audiences: [vip]\n    identities: [{namespace: CRMID}]\n"
              "    attributes: [loyalty.tier]\n    batch: {max_records: 50, max_age_ms: 10}\n")
    return ("destinations:\n"
            f"  - name: mail-{suffix}\n" + common + f"    url: {url}/mail\n"
            "    consent: {attribute: consents.email, deny_values: [\"no\"]}\n"
            f"  - name: open-{suffix}\n" + common + f"    url: {url}/open\n")


def avro_change(profile_id: str, consent: str, before: str, key: str) -> dict[str, Any]:
    """A profile change of consents.email as the worker sends it (every Avro field given)."""
    msg = profile_change(profile_id, changed_attributes=["consents.email"], memberships=["vip"], consent=consent,
                         key=key, previous={"consents.email": before}, memberships_changed=[])
    msg["identities"] = {"CRMID": [f"C-{profile_id}"]}
    return msg


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def record(pid: str, status: str, key: str, t: int, reason: str | None = None) -> dict[str, Any]:
    """A delivered record as the webhook receives it (the destination's name is in the envelope)."""
    out: dict[str, Any] = {
        "profile_id": pid, "audience_id": "vip", "kind": "membership", "status": status,
        "identities": {"CRMID": [f"C-{pid}"]}, "attributes": {"loyalty.tier": "gold"}, "idempotency_key": key,
        "event_time_ms": t, "source_emit_ms": t if reason else t + 5}
    if reason is not None:
        out["reason"] = reason
        out["attributes"] = {"loyalty.tier": "platinum"}
    return out


async def test_consent_is_checked_on_every_message_and_withdrawal_and_grant_reach_that_destination_only(
        registry: TopicRegistry, kafka_bootstrap: str, receiver: Receiver, topic_prefix: str) -> None:
    suffix = topic_prefix.rstrip("-")
    configs = list(parse_destinations(destinations(receiver.base_url, suffix)))
    runner = DestinationRunner(configs, kafka=kafka_bootstrap, topics=registry, decode=registry_decoder(registry),
                               settings=RunnerSettings(commit_interval_ms=200))
    unknown = metrics.DESTINATION_CONSENT_UNKNOWN.labels(f"mail-{suffix}")
    unknown_before = unknown._value.get()

    def delivered(path: str) -> list[dict[str, Any]]:
        return [receiver.first_stored[k][1] for k in receiver.keys(path)]

    await runner.start()
    try:
        # Given a vip member p1 who consented (the message carries consents.email though vip does not list
        # it), and a vip member p2 whose message carries no consent value (a worker without the rule)
        p1 = membership("p1", "vip", email=None, crm="C-p1", consent="yes", key="p1-enter")
        p2 = membership("p2", "vip", email=None, crm="C-p2", consent=None, key="p2-enter")
        produce(registry, kafka_bootstrap, MEMBERSHIPS, [p1, p2], key=lambda v: v["profile_id"])
        await until(lambda: len(receiver.keys("/mail")) == 1 and len(receiver.keys("/open")) == 2, "the enters")
        # When p1 withdraws consent to e-mail
        produce(registry, kafka_bootstrap, PROFILE_CHANGES, [avro_change("p1", "no", "yes", "w1")],
                key=lambda v: v["profile_id"])
        await until(lambda: len(receiver.keys("/mail")) == 2, "the withdrawal")
        # And grants it again
        produce(registry, kafka_bootstrap, PROFILE_CHANGES, [avro_change("p1", "yes", "no", "g1")],
                key=lambda v: v["profile_id"])
        await until(lambda: len(receiver.keys("/mail")) == 3, "the grant")

        async def settled() -> bool:
            return all(s.lag == 0 for s in (await runner.status()).values())

        deadline = time.monotonic() + 30
        while not await settled():
            assert time.monotonic() < deadline, await runner.status()
            await asyncio.sleep(0.2)
        # Then the consent destination got p1's enter, its exit and its enter again, each saying why; p2 not
        assert delivered("/mail") == [
            record("p1", "realized", "p1-enter", 1_000),
            record("p1", "exited", "w1:consent-exit:vip", 2_000, "consent_withdrawn"),
            record("p1", "realized", "g1:consent-enter:vip", 2_000, "consent_granted"),
        ]
        # And the destination without a rule got both enters (two profiles: two partitions, in either order)
        # and nothing of the consent changes
        assert sorted(delivered("/open"), key=lambda r: r["profile_id"]) == [record("p1", "realized", "p1-enter", 1_000),
                                      record("p2", "realized", "p2-enter", 1_000)]
        st = await runner.status()
        assert st[f"mail-{suffix}"].skipped == {"consent_unknown": 1}
        assert st[f"open-{suffix}"].skipped == {"no_mapped_change": 2}
        assert unknown._value.get() - unknown_before == 1
    finally:
        await runner.stop()
