"""librdkafka's repeated log lines are let through once per REPEAT_S, with a count of the rest."""

from __future__ import annotations

import logging

from shared.eventing.broker_process import REPEAT_S, QuietRepeats


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("shared.kafka", logging.ERROR, __file__, 1, message, (), None)


def test_lines_that_differ_only_in_numbers_pass_once_per_window_with_a_count() -> None:
    now = [100.0]
    quiet = QuietRepeats(clock=lambda: now[0])
    refused = "FAIL [rdkafka#consumer-{}] 127.0.0.1:{}: Connect failed: Connection refused (after {}ms)"
    assert quiet.filter(_record(refused.format(3, 4242, 0)))
    assert not any(quiet.filter(_record(refused.format(c, 4242, ms))) for c in range(4, 12) for ms in (0, 1))
    assert quiet.filter(_record("SESSTMOUT [rdkafka#consumer-3] session timed out"))  # another kind
    now[0] += REPEAT_S
    later = _record(refused.format(5, 4242, 3))
    assert quiet.filter(later)
    assert later.getMessage().endswith(f"(16 like it in the last {REPEAT_S:.0f} s)")
    assert not quiet.filter(_record(refused.format(6, 4242, 0)))
