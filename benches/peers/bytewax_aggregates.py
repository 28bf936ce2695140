"""The bytewax peer of primespark's aggregates-only job, for `pipeline_e2e`.

Reads the bench topic from the beginning, keys events by device, folds each device's
1-minute event-time windows (count, sum, min, max per metric) and COPYs every closed window
to PostgreSQL, one row per (minute, device, metric): the rows primespark writes to
`device_metrics_1m`. Exits when the topic's end is reached and every window is written.

Written as a bytewax user would write it for speed: one keyed fold per event (not one item per
sample), windows closed by event time with no system-time wait, batched COPY per sink batch.

Environment: BENCH_BROKERS, BENCH_TOPIC, BENCH_PG_URL (a database with table `bytewax_1m`).
Run: python -m bytewax.run benches/peers/bytewax_aggregates.py:flow
"""

import json
import os
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import psycopg
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.operators import windowing as win
from bytewax.outputs import DynamicSink, StatelessSinkPartition

BROKERS = os.environ["BENCH_BROKERS"]
TOPIC = os.environ["BENCH_TOPIC"]
URL = os.environ["BENCH_PG_URL"]
ALIGN = datetime(2020, 1, 1, tzinfo=timezone.utc)
LENGTH = timedelta(minutes=1)
COPY = "COPY bytewax_1m (bucket, device_id, metric_name, count, sum, min, max) FROM STDIN"


class _PgPartition(StatelessSinkPartition):
    def __init__(self):
        self._conn = psycopg.connect(URL, autocommit=True)

    def write_batch(self, items):
        with self._conn.cursor().copy(COPY) as copy:
            for device, (window_id, acc) in items:
                bucket = ALIGN + window_id * LENGTH
                for metric, (n, total, lo, hi) in acc.items():
                    copy.write_row((bucket, device, metric, n, total, lo, hi))

    def close(self):
        self._conn.close()


class _PgSink(DynamicSink):
    def build(self, step_id, worker_index, worker_count):
        return _PgPartition()


def _parse(msg):
    event = json.loads(msg.value)
    ts = datetime.fromtimestamp(event["timestamp"] / 1000, tz=timezone.utc)
    return event["device_id"], (ts, event["metrics"])


def _fold(acc, item):
    for metric, value in item[1].items():
        if value is None:
            continue
        v = float(value)
        slot = acc.get(metric)
        if slot is None:
            acc[metric] = [1, v, v, v]
        else:
            slot[0] += 1
            slot[1] += v
            if v < slot[2]:
                slot[2] = v
            if v > slot[3]:
                slot[3] = v
    return acc


def _merge(a, b):
    for metric, (n, total, lo, hi) in b.items():
        slot = a.get(metric)
        if slot is None:
            a[metric] = [n, total, lo, hi]
        else:
            slot[0] += n
            slot[1] += total
            slot[2] = min(slot[2], lo)
            slot[3] = max(slot[3], hi)
    return a


flow = Dataflow("bytewax_aggregates")
events = op.input(
    "kafka",
    flow,
    KafkaSource(
        [BROKERS],
        [TOPIC],
        tail=False,
        add_config={
            # Its fastest settings here (as primespark's reader): 1 MiB fetches, and a quick
            # refetch after a response overfills the queue (librdkafka waits 1 s by default).
            "fetch.max.bytes": "1048576",
            "fetch.queue.backoff.ms": "10",
        },
    ),
)
keyed = op.map("parse", events, _parse)
clock = win.EventClock(lambda item: item[0], wait_for_system_duration=timedelta(seconds=0))
windower = win.TumblingWindower(length=LENGTH, align_to=ALIGN)
windows = win.fold_window("1m", keyed, clock, windower, dict, _fold, _merge)
op.output("postgres", windows.down, _PgSink())
