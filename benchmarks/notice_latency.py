"""Notice delivery latency on loopback: producer socket send to consumer parse, across processes.

    python -m benchmarks.notice_latency --count 2000 --json OUT.json

Each notice is a real protocol-v1 notice for the NT3 example (layout and all), signed when
--key is given, sent one at a time (a burst would measure queueing, not delivery). Both
processes stamp with the same host clock.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import zmq

from viper_lightning import Location, Notice, take_snapshot
from viper_lightning._digest import digest_buffer
from viper_lightning.transport._pubsub import NoticeBroadcaster, NoticeListener

from examples.nt3.model import NT3

WAIT_S = 60.0


def example_notice(version: int) -> Notice:
    snapshot = take_snapshot(NT3(input_length=600, conv_channels=8, dense_units=32).state_dict())
    return Notice(model="nt3", version=version, nbytes=snapshot.layout.nbytes,
                  digest=digest_buffer(snapshot.data), layout=snapshot.layout, producer="bench",
                  locations=(Location("pfs", "host", "/pfs/nt3/v1"),))


def _listen(endpoint: str, count: int, key: bytes | None, results) -> None:
    latencies = []
    context = zmq.Context()
    with NoticeListener(context, endpoint, "nt3") as listener:
        while len(latencies) < count:
            for payload in listener.receive(WAIT_S):
                notice = Notice.decode(payload, key)
                latencies.append(time.time() - notice.created_at)
    context.term()
    results.put(latencies)


def measure(count: int, key: bytes | None) -> list[float]:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    context = zmq.Context()
    template = example_notice(1)
    with NoticeBroadcaster(context, "tcp://127.0.0.1:*") as broadcaster:
        process = spawn.Process(target=_listen, args=(broadcaster.endpoint, count, key, results))
        process.start()
        while not broadcaster.new_subscriptions():  # wait for the subscription, not a guess
            time.sleep(0.001)
        for version in range(1, count + 1):
            notice = Notice(**{**template.__dict__, "version": version, "created_at": time.time()})
            broadcaster.send("nt3", notice.encode(key))
            time.sleep(0.001)  # one at a time: spacing, not synchronisation
        latencies = results.get(timeout=WAIT_S)
        process.join(WAIT_S)
    context.term()
    return latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--key", help="sign notices with this shared key (16+ bytes)")
    parser.add_argument("--json", help="write the latencies summary here")
    args = parser.parse_args(argv)
    key = args.key.encode() if args.key else None
    latencies = sorted(measure(args.count, key))
    summary = {"count": len(latencies), "signed": key is not None,
               "notice_bytes": len(example_notice(1).encode(key)),
               "p50_ms": statistics.median(latencies) * 1e3,
               "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
               "max_ms": latencies[-1] * 1e3}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2)


if __name__ == "__main__":
    main()
