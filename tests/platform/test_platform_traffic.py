"""Revisions and traffic: the split by percentages, tag URLs, live traffic changes, digits v2 (INT8)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from platform_helpers import Client, revision, wait_for, write_service

from functions.digits.build import MIN_INT8_ACCURACY, compare_versions
from shared.platform import Platform
from shared.service_files import write_file
from shared.traffic import update_file

CANARY = [
    {"tag": "current", "revisionName": "digits-v1-cpu", "latestRevision": False, "percent": 70},
    {"tag": "candidate", "revisionName": "digits-v2-cpu", "latestRevision": False, "percent": 30},
]


def test_split_by_percent_and_tag_urls(make_platform: Callable[..., Platform], knative: Path) -> None:
    write_service(knative, traffic=CANARY)
    platform = make_platform()
    client = Client(platform.url_for("digits"))
    versions = Counter(client.post() for _ in range(400))
    client.close()
    assert set(versions) <= {(200, "1"), (200, "2")}
    share = versions[(200, "2")] / 400
    # 30 % of 400: standard deviation 9.2 requests (2.3 %); 5 sigma either side.
    assert 0.185 <= share <= 0.415, versions

    for tag, version in (("current", "1"), ("candidate", "2")):
        tagged = Client(platform.tag_url("digits", tag))
        assert {tagged.post() for _ in range(20)} == {(200, version)}
        tagged.close()
        # The same through the gateway, by Host header as Knative names tag URLs.
        host = f"{tag}-digits.default.svc.cluster.local"
        by_host = Client(platform.gateway_url, host=host)
        assert {by_host.post() for _ in range(5)} == {(200, version)}
        by_host.close()
    assert Client(platform.gateway_url, host="digits.default").post()[0] == 200
    assert revision(platform, "digits-v2-cpu")["model_version"] == "2"


def test_traffic_change_under_load_loses_nothing(make_platform: Callable[..., Platform], knative: Path) -> None:
    path = write_service(knative)
    platform = make_platform()
    results: list[tuple[int, str]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        client = Client(platform.url_for("digits"))
        while not stop.is_set():
            answer = client.post()
            with lock:
                results.append(answer)
        client.close()

    def seen(version: str) -> Callable[[], bool]:
        def check() -> bool:
            with lock:
                return (200, version) in results[-20:]

        return check

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(seen("1"), 30, "v1 answering")
        # What `onnxfn traffic digits --dir <dir> digits-v2-cpu=100 --tag digits-v2-cpu=candidate` writes.
        write_file(path, update_file(path, ["digits-v2-cpu=100"], ["digits-v2-cpu=candidate"], []))
        wait_for(lambda: seen("2")() and not any(v == "1" for _, v in results[-20:]), 30, "v2 taking all traffic")
        write_file(path, update_file(path, ["current=50", "candidate=50"], [], []))
        wait_for(seen("1"), 30, "v1 back in the split")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    statuses = Counter(status for status, _ in results)
    assert set(statuses) == {200}, statuses
    assert {v for _, v in results} == {"1", "2"}
    assert platform.tag_url("digits", "candidate")


def test_digits_v2_int8_accuracy(model_dir: Path) -> None:
    report = compare_versions(model_dir, seconds=0.05)
    assert report["2"]["accuracy"] >= MIN_INT8_ACCURACY
    assert report["1"]["accuracy"] >= MIN_INT8_ACCURACY


def test_the_traffic_command_takes_effect_on_a_running_platform(
    make_platform: Callable[..., Platform], knative: Path
) -> None:
    """`onnxfn traffic` on the rendered folder (both variants) changes what the platform serves, live."""
    import argparse

    from shared import render, traffic

    render.run(argparse.Namespace(out=knative, image=render.IMAGE, check=False))
    platform = make_platform()
    client = Client(platform.url_for("digits"))
    assert {client.post() for _ in range(5)} == {(200, "1")}
    args = argparse.Namespace(
        service="digits", splits=["digits-v2=100"], traffic=[], tag=["digits-v2=candidate"], untag=[],
        dir=knative, dry_run=False,
    )  # fmt: skip
    assert traffic.run(args) == 0  # names the GPU-form revision; the CPU file gets digits-v2-cpu
    wait_for(lambda: client.post() == (200, "2") and client.post() == (200, "2"), 30, "v2 serving all traffic")
    assert {Client(platform.tag_url("digits", "candidate")).post() for _ in range(3)} == {(200, "2")}
    client.close()
