"""A bounded load on the live server: every prediction is accepted or refused (429 with a
Retry-After), and none is lost."""

from __future__ import annotations

import asyncio


def test_load_every_prediction_is_accepted_or_refused_and_none_lost(server_factory):
    from bench.load import run_load

    server = server_factory("--max-queue", "100", "--log-level", "warning")
    report = asyncio.run(run_load(server.url, total=300, concurrency=50, polls=2, drain_timeout_s=110))
    print("\nload: 300 creates, 50 at once, --max-queue 100\n" + "\n".join(report.lines()))
    assert report.server_errors == 0 and report.transport_errors == []
    assert set(report.create_statuses) <= {201, 429}, report.create_statuses
    assert report.created + report.refused == 300
    assert report.refused > 0 and report.refused_without_retry_after == 0  # the queue really filled up
    assert report.created >= 100
    assert report.stuck == [] and report.final_statuses == {"succeeded": report.created}
    assert report.missing_from_list == []
