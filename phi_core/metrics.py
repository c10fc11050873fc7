"""Server metrics in Prometheus' text exposition format (version 0.0.4): counters, gauges read at scrape time, and
histograms with cumulative buckets. Small enough that the server needs no client library."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from typing import TypeVar

LabelValues = tuple[str, ...]
M = TypeVar("M", bound="Metric")


class Metric:
    def __init__(self, name: str, help_text: str, kind: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help_text, self.kind, self.labels = name, help_text, kind, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError

    def _label_text(self, values: LabelValues, extra: str = "") -> str:
        pairs = [f'{name}="{_escape(value)}"' for name, value in zip(self.labels, values, strict=True)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""


class Counter(Metric):
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help_text, "counter", labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self.values.items())
        if not items and not self.labels:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{self._label_text(k)} {_number(v)}" for k, v in items]


class Gauge(Metric):
    """A value read when scraped."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text, "gauge")
        self.read = read

    def lines(self) -> list[str]:
        return [*self.header(), f"{self.name} {_number(self.read())}"]


class ReadCounter(Gauge):
    """A count kept elsewhere (by the engine), read when scraped: a counter, since it only grows."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text, read)
        self.kind = "counter"


class Histogram(Metric):
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_text, "histogram")
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def lines(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, running = self.header(), 0
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            running += count
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        return [*out, f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for metric in self.metrics for line in metric.lines()) + "\n"


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """What ``phi serve`` reports at ``/metrics``; the queue depth, batch size and prompt lookup's token counts are
    read from the engine."""

    def __init__(
        self,
        waiting: Callable[[], float],
        running: Callable[[], float],
        proposed: Callable[[], float],
        accepted: Callable[[], float],
    ) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.requests = add(Counter("phi_requests_total", "HTTP requests by endpoint and status.", ("path", "status")))
        self.prompt_tokens = add(Counter("phi_prompt_tokens_total", "Prompt tokens of completion requests."))
        self.generation_tokens = add(Counter("phi_generation_tokens_total", "Tokens generated."))
        add(Gauge("phi_queue_depth", "Requests waiting for a row of the batch.", waiting))
        add(Gauge("phi_batch_size", "Requests being decoded together.", running))
        add(
            ReadCounter(
                "phi_speculative_proposed_tokens_total", "Tokens prompt lookup proposed and a pass checked.", proposed
            )
        )
        add(
            ReadCounter(
                "phi_speculative_accepted_tokens_total", "Proposed tokens kept (each saves a decode step).", accepted
            )
        )
        self.time_to_first_token = add(
            Histogram(
                "phi_time_to_first_token_seconds", "From a request's arrival to its first token.", LATENCY_BUCKETS
            )
        )
        self.inter_token = add(
            Histogram("phi_inter_token_latency_seconds", "Between consecutive tokens of one sequence.", LATENCY_BUCKETS)
        )
        self.request_seconds = add(
            Histogram(
                "phi_request_duration_seconds", "From a completion request's arrival to its end.", LATENCY_BUCKETS
            )
        )

    def render(self) -> str:
        return self.registry.render()


def _number(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
