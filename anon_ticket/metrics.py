"""Prometheus metrics: one registry per process, created by the tree and passed to actors.

Names of the original are kept (`api_redeem_requests_total`, ...); ours are added beside them.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import disable_created_metrics as _disable_created
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

_disable_created()  # type: ignore[no-untyped-call]


class GcTimes:
    """Time in CPython's cyclic garbage collector, by generation: a `gc.callbacks` hook that
    only adds to floats (the registry reads them when scraped). A pause in the collector is
    a pause of every request in the process; this says how much of the CPU it takes."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            generation = info["generation"]
            self.seconds[generation] += time.perf_counter() - self._started
            self.collections[generation] += 1

    def collect(self) -> Iterator[Metric]:
        seconds = CounterMetricFamily(
            "anon_ticket_gc_seconds", "Time in the cyclic garbage collector, by generation",
            labels=["generation"])
        collections = CounterMetricFamily(
            "anon_ticket_gc_collections", "Cyclic garbage collections, by generation",
            labels=["generation"])
        threshold = GaugeMetricFamily(
            "anon_ticket_gc_threshold", "The collector's thresholds (gc.get_threshold())",
            labels=["generation"])
        for generation, value in enumerate(gc.get_threshold()):
            seconds.add_metric([str(generation)], self.seconds[generation])
            collections.add_metric([str(generation)], self.collections[generation])
            threshold.add_metric([str(generation)], value)
        yield seconds
        yield collections
        yield threshold


class ConnectionStats:
    """Each listener's connections as its connection policy counts them
    (anon_ticket/hypercorn_fixes.py), read when scraped."""

    def __init__(self) -> None:
        self.policies: dict[str, Any] = {}  # listener name -> its running ConnectionPolicy

    def collect(self) -> Iterator[Metric]:
        open_ = GaugeMetricFamily("anon_ticket_connections", "Open connections, by listener",
                                  labels=["listener"])
        families = {
            "refused": CounterMetricFamily(
                "anon_ticket_connections_refused",
                "Connections turned away with a 503: every slot busy", labels=["listener"]),
            "evicted": CounterMetricFamily(
                "anon_ticket_connections_evicted",
                "Idle connections closed to make room for a new one", labels=["listener"]),
            "contained": CounterMetricFamily(
                "anon_ticket_connection_errors_contained",
                "Connections ended by an error of their own (nothing else affected)",
                labels=["listener"]),
        }
        for name, policy in sorted(self.policies.items()):
            open_.add_metric([name], len(policy.connections))
            for attr, family in families.items():
                family.add_metric([name], getattr(policy, attr))
        yield open_
        yield from families.values()


class DiskSpace:
    """Free and total bytes of the filesystems the data lives on, read when scraped (a full
    disk stops every claim: an operator should see it coming)."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}  # "data" / "database" -> a directory

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily("anon_ticket_disk_free_bytes",
                                 "Bytes free to the service on the filesystem holding `dir`",
                                 labels=["dir"])
        size = GaugeMetricFamily("anon_ticket_disk_size_bytes",
                                 "Size of the filesystem holding `dir`", labels=["dir"])
        for name, path in sorted(self.paths.items()):
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            free.add_metric([name], st.f_bavail * st.f_frsize)
            size.add_metric([name], st.f_blocks * st.f_frsize)
        yield free
        yield size


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # process_start_time_seconds (a restart of the whole process resets every counter),
        # descriptors against their limit, memory
        ProcessCollector(registry=r)
        self.disk = DiskSpace()
        r.register(self.disk)
        # The process installs this in gc.callbacks (one process, one tree); until then 0.
        self.gc_times = GcTimes()
        r.register(self.gc_times)
        # --- the original's names
        self.redeem_requests = Counter(
            "api_redeem_requests", "Redeem requests by outcome", ["status"], registry=r)
        self.redeem_cache_hints = Counter(
            "api_redeem_cache_hints", "Filter answers on the redeem path", ["hint"], registry=r)
        self.redeem_bloom_db_miss = Counter(
            "api_redeem_bloom_db_miss",
            "Bloom said maybe, storage said not found (false positives and unconfirmed pids)",
            registry=r)
        self.token_requests = Counter(
            "api_token_requests", "Token requests by endpoint and outcome",
            ["endpoint", "status"], registry=r)
        self.workers_scraped = Gauge(
            "anon_ticket_workers_scraped", "Worker processes whose metrics this scrape has "
            "(with --workers N, the others are restarting)", registry=r)
        self.wallet_height = Gauge("monitor_wallet_height", "Wallet height", registry=r)
        self.last_height = Gauge("monitor_last_height", "Highest height fully scanned",
                                 registry=r)
        self.rpc_calls = Counter("monitor_rpc_calls", "wallet-rpc calls by result", ["result"],
                                 registry=r)
        self.payments_ingested = Counter(
            "monitor_payments_ingested", "Transfers seen by the poller, by result", ["result"],
            registry=r)
        # --- ours
        self.held_unknown = Counter(
            "anon_ticket_held_unknown",
            "Answers about unknown ids held back past their rate (a spray slowing itself)",
            registry=r)
        self.connections = ConnectionStats()
        r.register(self.connections)
        self.storage_requests = Counter(
            "anon_ticket_storage_requests", "Requests handled by the storage actor", ["kind"],
            registry=r)
        self.batch_size = Histogram(
            "anon_ticket_storage_batch_size", "Requests per storage transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.commit_seconds = Histogram(
            "anon_ticket_storage_commit_seconds", "Time to run and commit one storage transaction",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r)
        self.wal_checkpoints = Counter(
            "anon_ticket_storage_wal_checkpoints", "WAL checkpoints run off the loop, by mode "
            "(passive; restart when a busy writer kept the log from starting over)", ["mode"],
            registry=r)
        self.wal_pages = Gauge(
            "anon_ticket_storage_wal_pages", "Pages in the write-ahead log after the last commit",
            registry=r)
        self.batches_failed = Counter(
            "anon_ticket_storage_batches_failed", "Storage transactions lost (a failed COMMIT)",
            registry=r)
        self.expired_dropped = Counter(
            "anon_ticket_storage_expired_dropped", "Requests dropped because their deadline passed",
            registry=r)
        self.restarts = Counter("anon_ticket_actor_restarts", "Actor restarts", ["actor"],
                                registry=r)
        self.mailbox_depth = Gauge("anon_ticket_mailbox_depth", "Envelopes waiting", ["actor"],
                                   registry=r)
        self.poll_lag = Gauge("anon_ticket_poll_lag_blocks",
                              "Wallet height minus the highest height scanned", registry=r)
        self.last_poll_age = Gauge("anon_ticket_last_successful_poll_age_seconds",
                                   "Seconds since the last successful poll", registry=r)
        self.bloom_entries = Gauge("anon_ticket_bloom_entries", "Payment ids in the Bloom filter",
                                   registry=r)
        self.poller_leader = Gauge("anon_ticket_poller_leader",
                                   "1 while this node runs the poller (PostgreSQL: the node "
                                   "holding the poller lock), else 0", registry=r)
        self.feed_applied = Gauge("anon_ticket_cluster_feed_applied",
                                  "Last cluster feed entry this node applied (PostgreSQL)",
                                  registry=r)
        self.alerts = Counter("anon_ticket_alerts", "Conditions an operator must look at",
                              ["kind"], registry=r)


def merged_exposition(own: CollectorRegistry, workers: Mapping[int, str]) -> bytes:
    """This process's metrics and its workers' (their text, as each scraped itself), as one
    exposition: each family once, every worker's samples labelled `worker="N"`. So sums over
    the family count every process, and one worker can still be told apart."""
    families: dict[str, Metric] = {}
    for family in own.collect():
        families[family.name] = family
    for index, text in sorted(workers.items()):
        label = str(index)
        for family in text_string_to_metric_families(text):
            target = families.get(family.name)
            if target is None:
                target = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            target.samples.extend(
                Sample(s.name, {**s.labels, "worker": label}, s.value, s.timestamp, s.exemplar)
                for s in family.samples)

    class _Merged(Collector):
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)

