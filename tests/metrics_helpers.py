"""Reading a server's /metrics in tests."""

from __future__ import annotations

import requests


def scrape(url: str) -> dict[str, float]:
    """Every sample of `url`/metrics, by its name and labels as written."""
    samples: dict[str, float] = {}
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
