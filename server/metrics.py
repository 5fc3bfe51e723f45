"""/metrics in Prometheus' text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .protocol import Status


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("flux_fill_queue_depth", "Predictions waiting to run", registry=self.registry)
        self.predictions = Gauge("flux_fill_predictions", "Predictions recorded, by status", ["status"], registry=self.registry)
        self.created = Counter("flux_fill_predictions_created", "Predictions accepted since start", registry=self.registry)
        self.refused = Counter("flux_fill_predictions_refused", "Creates refused (queue full or rate limit)", registry=self.registry)
        self.predict_time = Histogram(
            "flux_fill_predict_seconds", "Time to run one prediction", registry=self.registry,
            buckets=(0.5, 1, 2, 3, 4, 6, 8, 12, 20, 30, 60, 120, 300),
        )
        self.gpu_memory = Gauge("flux_fill_gpu_memory_bytes", "GPU memory allocated by the worker", ["device", "kind"], registry=self.registry)
        self.webhooks = Gauge("flux_fill_webhook_deliveries", "Webhook deliveries since start, by outcome", ["outcome"], registry=self.registry)

    def render(self, store, devices: list[str], webhook_stats: dict | None) -> bytes:
        counts = store.count_by_status()
        self.queue_depth.set(counts.get(Status.STARTING.value, 0))
        for status in Status:
            self.predictions.labels(status.value).set(counts.get(status.value, 0))
        for device in devices:
            if device.startswith("cuda"):
                try:
                    import torch

                    self.gpu_memory.labels(device, "allocated").set(torch.cuda.memory_allocated(device))
                    self.gpu_memory.labels(device, "peak").set(torch.cuda.max_memory_allocated(device))
                except Exception:
                    pass
        for outcome, n in (webhook_stats or {}).items():
            self.webhooks.labels(outcome).set(n)
        return generate_latest(self.registry)
