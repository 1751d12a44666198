"""`onnxfn plot`: a PNG per report kind, next to its JSON, of the figures the report holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.bench.plots import kind_of
from shared.config import PROJECT_ROOT

pytest.importorskip("matplotlib")


def _stats(median: float) -> dict[str, float]:
    return {"median": median, "min": median * 0.9, "max": median * 1.1}


def _phase(rate: float, concurrency: int) -> dict[str, object]:
    return {"req_per_s": _stats(rate * concurrency**0.5), "p99_ms": _stats(2.0 * concurrency),
            "cpu_ms_per_req": _stats(0.3), "non_200": 0}  # fmt: skip


def _peers() -> dict[str, object]:
    systems = {
        name: {"cold_start_s": _stats(1.0), "exit_codes": [0], **{f"c{c}": _phase(rate, c) for c in (1, 8, 32)}}
        for name, rate in (("onnxfn", 1000.0), ("kserve", 500.0))
    }
    model = {"raw": {"best_rows_per_s": 9e4}, "systems": systems}
    return {"options": {"concurrencies": [1, 8, 32], "rounds": 3}, "models": {"mlp": model}}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png_per_report_next_to_its_json(tmp_path: Path) -> None:
    soak = {
        "rate": 200,
        "windows": [{"until_s": 30.0 * i, "p50_ms": 20 + i, "p99_ms": 60 + i, "behind": i} for i in range(1, 6)],
    }
    cold = {
        "first_reply_s": 1.2,
        "imports_and_boot_s": 0.6,
        "model_load_s": 0.3,
        "warmup_s": 0.1,
        "ready_to_reply_s": 0.05,
    }
    functions = {"digits": {"cold_start": cold}, "embed": {"cold_start": {**cold, "model_load_s": 1.1}}}
    reports = {"peers.json": _peers(), "bench.json": functions, "bench-events-soak.json": soak}  # fmt: skip
    for name, report in reports.items():
        (tmp_path / name).write_text(json.dumps(report))
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "plot", *[str(tmp_path / n) for n in reports]],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["bench-cold-start.png", "bench-events-soak.png", "peers-mlp.png"]
    width, height = _png_size(tmp_path / "peers-mlp.png")
    assert width > 1000 and height > 400  # two panels side by side


def test_plot_refuses_a_report_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "other.json").write_text('{"x": 1}')
    done = subprocess.run([sys.executable, "-m", "shared.cli", "plot", str(tmp_path / "other.json")],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "not a report of onnxfn bench" in done.stderr
    with pytest.raises(ValueError):
        kind_of({"x": 1})
