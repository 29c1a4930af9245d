"""Prometheus metrics of one server: requests, queues, jobs, component time, memory."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kiln_requests",
            "HTTP requests by route and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "kiln_request_seconds",
            "HTTP request latency.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth", "Jobs waiting or running per model.", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "kiln_queue_wait_seconds",
            "Time a job waited before it ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "kiln_jobs",
            "Finished jobs by model, kind and state.",
            ["model", "kind", "state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "kiln_job_seconds",
            "Time a job ran.",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.component = Gauge(
            "kiln_component_seconds",
            "Latest time of one component call (UNet step, vision).",
            ["model", "component"],
            registry=r,
        )
        self.rss = Gauge("kiln_process_rss_bytes", "Resident memory of the server.", registry=r)
        self.vram = Gauge(
            "kiln_gpu_memory_bytes",
            "GPU memory allocated by torch (GPU machines only).",
            ["device"],
            registry=r,
        )

    def job_finished(self, job: Any) -> None:
        self.jobs.labels(job.model, job.kind, job.state.value).inc()
        if job.started is not None:
            self.queue_wait.labels(job.model).observe(job.started - job.created)
            self.job_seconds.labels(job.model, job.kind).observe(job.finished - job.started)

    def render(self, registry: Any) -> bytes:
        """The exposition text, with the gauges read now."""
        import psutil

        for name, queue in registry.board.queues.items():
            self.queue_depth.labels(name).set(queue.depth)
        for model in registry.models.values():
            for component, seconds in model.component_seconds.items():
                self.component.labels(model.name, component).set(seconds)
        self.rss.set(psutil.Process().memory_info().rss)
        _gpu_memory(self.vram)
        return generate_latest(self.registry)


def _gpu_memory(gauge: Gauge) -> None:
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            gauge.labels(f"cuda:{index}").set(torch.cuda.memory_allocated(index))


def merge_expositions(by_replica: dict[str, bytes]) -> bytes:
    """Several replicas' exposition texts as one, each sample labelled with its `replica`.

    Prometheus scrapes one address; on Ray that address reaches one replica, which gathers
    the others' metrics (a broadcast) and answers for all of them.
    """
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    for replica, text in sorted(by_replica.items()):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                into.add_sample(sample.name, labels, sample.value, sample.timestamp)

    class _Families:
        def collect(self) -> Any:
            return iter(merged.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)
