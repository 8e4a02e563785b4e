"""/metrics in the Prometheus exposition format, through prometheus-client: requests and their
latency by view and status, compute time by level, source bytes read per byte served, every cache
section and the disk tier, the queue and the datasets. One registry per app, so several apps never
share counters.

Several server processes on one port (--processes) answer /metrics for all of them: a scrape
lands on any one, so they use prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set by the parent before they start), and each writes its live values there too (`_Mirror`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .cache import Cache
from .workers import Meter

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def shared() -> bool:
    """Whether this process is one of several (prometheus-client chose its multiprocess values)."""
    return values.ValueClass is not values.MutexValue


class Metrics:
    def __init__(self, cache: Cache, meter: Meter, datasets: Mapping, queued: Callable[[], int]):
        live = _Live(cache, meter, datasets, queued)
        if shared():
            self.registry, own = CollectorRegistry(), None  # metrics write to files; the collector reads all
            MultiProcessCollector(self.registry)
            self.mirror: _Mirror | None = _Mirror(live)
        else:
            self.registry = own = CollectorRegistry(auto_describe=True)
            self.registry.register(live)
            self.mirror = None
        self.requests = Counter("bil_transform_requests", "HTTP requests answered, by view and status",
                                ["view", "status"], registry=own)
        self.latency = Histogram("bil_transform_request_seconds", "Time to answer a request (its whole body), by view",
                                 ["view"], buckets=LATENCY_BUCKETS, registry=own)
        self.served = Counter("bil_transform_response_bytes", "Body bytes sent, gzip-encoded ones as sent",
                              registry=own)

    def observe(self, view: str, status: int, seconds: float, body_bytes: int) -> None:
        self.requests.labels(view, str(status)).inc()
        self.latency.labels(view).observe(seconds)
        self.served.inc(body_bytes)

    def exposition(self) -> bytes:
        if self.mirror is not None:
            self.mirror.sync()
        return generate_latest(self.registry)


class _Live(Collector):
    """What is read at scrape time from the objects that keep it: caches, the meter, the queue."""

    def __init__(self, cache: Cache, meter: Meter, datasets: Mapping, queued: Callable[[], int]):
        self.cache, self.meter, self.datasets, self.queued = cache, meter, datasets, queued

    def collect(self) -> Iterable[Metric]:
        stats = {name: counts for name, counts in self.cache.stats().items() if name not in ("all", "disk")}
        for counter in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(f"bil_transform_cache_{counter}", f"Cache {counter}, by cache section",
                                         labels=["cache"])
            for name, counts in stats.items():
                family.add_metric([name], counts[counter])
            yield family
        for gauge in ("bytes", "entries"):
            family = GaugeMetricFamily(f"bil_transform_cache_{gauge}", f"Cache {gauge} held, by cache section",
                                       labels=["cache"])
            for name, counts in stats.items():
                family.add_metric([name], counts[gauge])
            yield family
        yield GaugeMetricFamily("bil_transform_cache_max_bytes", "The cache budget (--cache-size)",
                                value=self.cache.max_bytes)
        if self.cache.disk is not None:
            yield from _disk(self.cache.disk.stats())
        computed = self.meter.snapshot()
        seconds = CounterMetricFamily("bil_transform_compute_seconds",
                                      "Worker time spent computing blocks of each level, the parent blocks "
                                      "they needed included", labels=["level"])
        blocks = CounterMetricFamily("bil_transform_blocks_computed", "Blocks computed, by level", labels=["level"])
        for level, (n, s) in sorted(computed["levels"].items()):
            seconds.add_metric([str(level)], s)
            blocks.add_metric([str(level)], n)
        yield seconds
        yield blocks
        yield CounterMetricFamily("bil_transform_source_bytes", "Voxel bytes read from source files (decoded); "
                                  "divide by bil_transform_response_bytes_total for bytes read per byte served",
                                  value=computed["source_bytes"])
        yield CounterMetricFamily("bil_transform_checksummed_bytes", "Source file bytes hashed for manifest "
                                  "checksums (each file version once, however many ask)",
                                  value=computed["hashed_bytes"])
        yield GaugeMetricFamily("bil_transform_queued_jobs", "Jobs waiting for or running on the workers",
                                value=self.queued())
        datasets = GaugeMetricFamily("bil_transform_datasets", "Datasets by status", labels=["status"])
        snapshots = [ds.snapshot for ds in self.datasets.values()]
        datasets.add_metric(["ok"], sum(s.error is None for s in snapshots))
        datasets.add_metric(["error"], sum(s.error is not None for s in snapshots))
        yield datasets
        prepared = GaugeMetricFamily("bil_transform_prepared_datasets", "Datasets by the state of their prepared "
                                     "coarse levels (serve --derived)", labels=["state"])
        states = [s.preparation.state for s in snapshots if s.pyramid is not None]
        for state in ("none", "in progress", "complete", "stale"):
            prepared.add_metric([state], states.count(state))
        yield prepared
        yield GaugeMetricFamily("bil_transform_prepared_bytes", "Bytes of the prepared levels the datasets read",
                                value=sum(s.preparation.bytes for s in snapshots))


def _disk(stats: Mapping[str, int]) -> Iterable[Metric]:
    """The disk tier (--disk-cache), shared by the processes of one machine."""
    for counter, what in (("hits", "Entries (encoded bodies, computed blocks) read from the disk tier"),
                          ("misses", "Entries not found on the disk tier"),
                          ("writes", "Entries written to the disk tier"),
                          ("waits", "Misses that waited for another process computing the same entry"),
                          ("damaged", "Entries dropped because their bytes failed their length or CRC-32C check")):
        yield CounterMetricFamily(f"bil_transform_disk_cache_{counter}", what, value=stats[counter])
    yield GaugeMetricFamily("bil_transform_disk_cache_bytes", "Bytes on the disk tier", value=stats["bytes"])
    yield GaugeMetricFamily("bil_transform_disk_cache_entries", "Entries on the disk tier", value=stats["entries"])
    yield GaugeMetricFamily("bil_transform_disk_cache_max_bytes", "The disk tier's bound (--disk-cache-size)",
                            value=stats["max_bytes"])


class _Mirror:
    """This process's live values written where prometheus-client's multiprocess mode adds them
    up with the other processes': counters by what they grew since the last sync, gauges as they
    are (summed over the live processes, or the largest where every process holds the same)."""

    MODES = {"bil_transform_datasets": "livemax", "bil_transform_prepared_datasets": "livemax",
             "bil_transform_prepared_bytes": "livemax", "bil_transform_disk_cache_bytes": "livemax",
             "bil_transform_disk_cache_entries": "livemax", "bil_transform_disk_cache_max_bytes": "livemax"}

    def __init__(self, live: Collector):
        self.live = live
        self._metrics: dict[str, Counter | Gauge] = {}
        self._seen: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def sync(self) -> None:
        with self._lock:
            for family in self.live.collect():
                for sample in family.samples:
                    metric = self._metric(family, tuple(sample.labels))
                    child = metric.labels(**sample.labels) if sample.labels else metric
                    if family.type == "counter":
                        seen = (sample.name, tuple(sample.labels.items()))
                        grown = sample.value - self._seen.get(seen, 0.0)
                        if grown > 0:
                            child.inc(grown)
                        self._seen[seen] = sample.value
                    else:
                        child.set(sample.value)

    def _metric(self, family: Metric, labels: tuple[str, ...]) -> Counter | Gauge:
        metric = self._metrics.get(family.name)
        if metric is None:
            if family.type == "counter":
                metric = Counter(family.name, family.documentation, labels, registry=None)
            else:
                metric = Gauge(family.name, family.documentation, labels, registry=None,
                               multiprocess_mode=self.MODES.get(family.name, "livesum"))
            self._metrics[family.name] = metric
        return metric
