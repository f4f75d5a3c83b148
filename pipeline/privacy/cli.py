"""`pipeline privacy erase|status|verify`: erase a person, follow the request, check that no trace is left.

Registered by `add_parser(sub)` from pipeline/cli.py's build_parser. Handlers are `func(args, settings) -> int`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.settings import Settings


def add_parser(sub: Any) -> None:
    p = sub.add_parser("privacy", help="erase a person (GDPR / CCPA), follow and verify the request")
    psub = p.add_subparsers(dest="action", required=True)
    e = psub.add_parser("erase", help="erase the person an identity belongs to, everywhere")
    e.add_argument("--namespace", required=True, help="an identity namespace of identity.yaml (e.g. Email)")
    e.add_argument("--id", required=True, help="the identity value (normalised as ingest does)")
    e.add_argument("--suppress", action="store_true",
                   help="also drop this identity from every later record (the suppression list)")
    e.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="wait up to S seconds for the request to be done (0: do not wait)")
    e.set_defaults(func=cmd_erase)
    s = psub.add_parser("status", help="a request's status")
    s.add_argument("--request", required=True)
    s.set_defaults(func=cmd_status)
    v = psub.add_parser("verify", help="scan the compacted topics for any trace of an erased person")
    v.add_argument("--request", required=True)
    v.add_argument("--find", action="append", default=[], metavar="VALUE",
                   help="also search for this value in plain text (an e-mail, a phone number, a profile id); "
                        "repeatable; never printed")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)


def _salt(settings: Settings) -> bytes:
    from pipeline.privacy.erasure import salt_of

    return salt_of(settings.erasure_salt, settings.app_id)


def identity_key(namespace: str, value: str, settings: Settings) -> str:
    """The normalised identity table key, or ConfigError naming what is wrong (never the value)."""
    from pipeline.identity.namespaces import normalise_identities
    from pipeline.settings import PipelineConfig

    cfg = PipelineConfig.load(settings.config_dir).profile.identity
    if namespace not in cfg.namespaces:
        raise ConfigError(f"unknown namespace {namespace!r}; valid: {', '.join(sorted(cfg.namespaces))}")
    ids, problems = normalise_identities([(namespace, value)], cfg)
    match = [i for i in ids if i.namespace == namespace]
    if not match:
        raise ConfigError("; ".join(problems) or f"not a valid {namespace} value")
    return match[0].key


def cmd_erase(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.clients import producer
    from pipeline.privacy.erasure import start_erasure

    reg = settings.topic_registry()
    key = identity_key(args.namespace, args.id, settings)
    request, sends = start_erasure(key, _salt(settings), suppress=args.suppress, now_ms=int(time.time() * 1000))
    p = producer(settings.kafka, partitioner="murmur2_random")  # the identity's partition, as the worker's
    for send in sends:
        spec = reg[send.topic]
        p.produce(spec.name, key=send.key.encode(), value=spec.codec.encode(send.value))
    if p.flush(30):
        print(f"erasure {request}: the request could not be delivered to Kafka", file=sys.stderr)
        return 1
    print(f"erasure {request}: requested" + (" (suppress)" if args.suppress else ""))
    if args.wait <= 0:
        return 0
    record = wait_done(settings, request, args.wait)
    if record is None:
        print(f"erasure {request}: not done after {args.wait:.0f} s (`pipeline privacy status --request "
              f"{request}`)", file=sys.stderr)
        return 1
    print(json.dumps(record, sort_keys=True))
    return 0


def wait_done(settings: Settings, request: str, timeout_s: float) -> dict[str, Any] | None:
    from pipeline.privacy.verify import find_request

    reg = settings.topic_registry()
    deadline = time.monotonic() + timeout_s
    while True:
        record = find_request(reg, settings.kafka, request)
        if record is not None and record.get("status") == "done":
            return record
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.privacy.verify import find_request

    record = find_request(settings.topic_registry(), settings.kafka, args.request)
    if record is None:
        print(f"no erasure request {args.request}", file=sys.stderr)
        return 1
    print(json.dumps(record, sort_keys=True))
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.privacy.verify import verify_topics

    v = verify_topics(settings.topic_registry(), settings.kafka, _salt(settings),
                      args.request, args.find)
    print(json.dumps(v.to_dict(), sort_keys=True) if args.json else "\n".join(v.lines()))
    return 0 if v.clean else 1
