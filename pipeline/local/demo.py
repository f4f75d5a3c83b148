"""`make run`: a local broker, the topics, one worker and a reproducible sample, with a live summary.

Ctrl-C stops everything it started (worker, then broker) and leaves no stray process.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.clients import produce_json_lines, tail
from pipeline.errors import ProcessNotReady
from pipeline.identity.namespaces import load_identity_config
from pipeline.ingest.keys import KeySpec, RecordKeyer
from pipeline.local import procs
from pipeline.local.broker import DEFAULT_DIR, DEFAULT_PORT, SINGLE_BROKER_ENV, LocalBroker, _alive, _read_pid
from pipeline.sample import write
from pipeline.settings import Settings, load_topics
from pipeline.topics import INGEST_EVENTS, INGEST_PROFILES, MEMBERSHIP_TOPIC, apply

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data"  # the demo's logs, sample and (unless PIPELINE_DATA_DIR says otherwise) worker state


def main() -> int:
    people = int(os.environ.get("SAMPLE_PEOPLE", "3000"))
    broker = LocalBroker(DEFAULT_DIR, DEFAULT_PORT, DEFAULT_PORT + 1)
    own_broker = not (_read_pid(DEFAULT_DIR) and _alive(_read_pid(DEFAULT_DIR) or 0))
    worker: subprocess.Popen[bytes] | None = None
    helpers: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if own_broker:
            print("starting the local Kafka broker...", flush=True)
            broker.start()
        print(f"broker on {broker.bootstrap}", flush=True)
        for key, value in SINGLE_BROKER_ENV.items():  # here and in the worker it starts
            os.environ.setdefault(key, value)
        reg = load_topics(prefix="")
        apply(reg, broker.bootstrap)
        log_path = DATA / "worker.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # state in the checkout's data/ (what `make clean` removes), not in the per-user default
        env = {"PIPELINE_DATA_DIR": str(DATA), **os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap}
        api_key = None
        if "PIPELINE_API_KEYS_FILE" not in env and "PIPELINE_API_AUTH" not in env:
            api_key = demo_api_key(DATA / "api-keys.yaml")
            env["PIPELINE_API_KEYS_FILE"] = str(DATA / "api-keys.yaml")
        ready_url = f"http://127.0.0.1:{Settings.from_env().web_port}/readyz"  # no API key needed
        worker = start_worker(procs.pipeline_command("worker"), env, log_path, ready_url)
        # activation: the demo webhook the example http destination points at, and the destination runner
        for name, args in (("receiver", ["destinations", "receive", "--port", "8089"]),
                           ("destinations", ["destinations", "run"])):
            helpers.append(procs.start(procs.pipeline_command(*args), env, DATA / f"{name}.log", append=True))
        print("destination runner and demo webhook started (logs in data/)", flush=True)
        ev, rec = write(people, DATA / "sample", int(time.time() * 1000))
        print(f"sample: {people} people -> {ev.name}, {rec.name}", flush=True)
        # keyed by each record's home identity, as producers should: one person's records stay in order
        identity = load_identity_config(Settings.from_env().config_dir / "identity.yaml")  # the worker's
        by_person = KeySpec.parse("identity")
        with open(rec) as f:
            n_rec = produce_json_lines(reg, broker.bootstrap, INGEST_PROFILES, f,
                                       key=RecordKeyer.for_codec(by_person, reg[INGEST_PROFILES].codec, identity))
        with open(ev) as f:
            n_ev = produce_json_lines(reg, broker.bootstrap, INGEST_EVENTS, f,
                                      key=RecordKeyer.for_codec(by_person, reg[INGEST_EVENTS].codec, identity))
        print(f"published {n_rec} CRM records and {n_ev} web events; membership changes follow:\n", flush=True)
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        shown = 0
        started = time.monotonic()
        for m in tail(reg, broker.bootstrap, MEMBERSHIP_TOPIC, idle_timeout_s=8):
            v = m["value"]
            counts[(v["audience_id"], v["status"])] += 1
            if shown < 8:
                shown += 1
                print(f"  {v['status']:9} {v['audience_id']:24} profile {v['profile_id']} "
                      f"({', '.join(v['identities'])}) via {v['evaluation']}")
        took = time.monotonic() - started
        print(f"\n{sum(counts.values())} membership changes in {took:.1f}s (incl. 8 s idle wait):")
        for (aud, status), n in sorted(counts.items()):
            print(f"  {aud:28} {status:9} {n}")
        dest_status = subprocess.run([sys.executable, "-m", "pipeline", "destinations", "status"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        print("\ndestinations:\n" + dest_status.stdout)
        key_env = f"PIPELINE_API_KEY={api_key} " if api_key else ""
        auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
        if api_key:
            print(f"\nthe worker's API key for this run (admin; in data/api-keys.yaml as a hash): {api_key}")
        print(f"\ntry:  {key_env}.venv/bin/pipeline profile get --namespace CRMID --id CRM70000001")
        print("      .venv/bin/pipeline tail activation.memberships --from-beginning --max 5")
        print(f"      curl -s{auth} localhost:6066/metrics | grep cdp_")
        print("\nrunning; Ctrl-C stops the worker and the broker.", flush=True)
        while worker.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        procs.stop_all(helpers)  # the runner and the webhook first: they read what the worker writes
        if worker is not None:
            procs.stop(worker)
        if own_broker:
            broker.stop()
        print("stopped.", flush=True)


def start_worker(command: list[str], env: dict[str, str], log_path: Path, ready_url: str,
                 timeout_s: float = 120) -> subprocess.Popen[bytes]:
    """Start the worker (appending to its log) and wait until its /readyz answers 200; one that exits or is not
    ready in time is stopped, its log's tail printed, and the demo ends (SystemExit)."""
    worker = procs.start(command, env, log_path, append=True)
    print(f"worker started (pid {worker.pid}, log {log_path}); waiting until ready...", flush=True)
    try:
        procs.wait_ready(worker, ready_url, timeout_s=timeout_s, name="the worker", log_path=log_path, poll_s=0.5)
    except ProcessNotReady as exc:
        procs.stop(worker)
        print(exc)
        raise SystemExit("the worker did not start; see the log above") from None
    return worker


def demo_api_key(path: Path) -> str:
    """A fresh admin key for this run, its hash written to `path` (the worker's keys file); the key is
    printed, never stored."""
    from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key

    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = ApiKey("make-run", hash_key(key), frozenset({"admin"}), "the key `make run` printed")
    path.write_text("# written by `make run` (pipeline/local/demo.py) for its worker; a new key every run\n"
                    "keys:\n" + entry_yaml(entry))
    return key


if __name__ == "__main__":
    sys.exit(main())
