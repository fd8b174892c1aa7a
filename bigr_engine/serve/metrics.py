"""Prometheus text-format metrics (counters, gauges, histograms), thread-safe, standard library only."""
from __future__ import annotations

import threading
from collections import defaultdict


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                          for k, v in sorted(labels.items())) + "}"


class Metrics:
    """What `GET /metrics` serves. Names follow Prometheus conventions (_total for counters, base units)."""

    def __init__(self, prefix: str = "bigr"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, float] = {}
        self._hists: dict[str, tuple[tuple[float, ...], dict]] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def counter(self, name: str, help: str):
        self._help[name] = ("counter", help)

    def gauge(self, name: str, help: str):
        self._help[name] = ("gauge", help)
        self._gauges.setdefault(name, 0.0)

    def histogram(self, name: str, help: str, buckets):
        self._help[name] = ("histogram", help)
        self._hists[name] = (tuple(sorted(buckets)), {"counts": [0] * len(buckets), "sum": 0.0, "count": 0})

    def inc(self, name: str, value: float = 1.0, **labels):
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float):
        with self._lock:
            self._gauges[name] = float(value)

    def observe(self, name: str, value: float):
        with self._lock:
            buckets, h = self._hists[name]
            for i, b in enumerate(buckets):
                if value <= b:
                    h["counts"][i] += 1
            h["sum"] += value
            h["count"] += 1

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's current value (tests, /v1/info)."""
        with self._lock:
            if name in self._gauges:
                return self._gauges[name]
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def histogram_counts(self, name: str) -> tuple[tuple[float, ...], list[int], int, float]:
        with self._lock:
            buckets, h = self._hists[name]
            return buckets, list(h["counts"]), h["count"], h["sum"]

    def render(self) -> str:
        out = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                full = f"{self.prefix}_{name}"
                out += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for key, v in sorted(self._counters[name].items()):
                        out.append(f"{full}{_labels(dict(key))} {v:g}")
                elif kind == "gauge":
                    out.append(f"{full} {self._gauges[name]:g}")
                else:
                    buckets, h = self._hists[name]
                    for b, c in zip(buckets, h["counts"]):
                        out.append(f'{full}_bucket{{le="{b:g}"}} {c}')
                    out += [f'{full}_bucket{{le="+Inf"}} {h["count"]}', f"{full}_sum {h['sum']:g}",
                            f"{full}_count {h['count']}"]
        return "\n".join(out) + "\n"
