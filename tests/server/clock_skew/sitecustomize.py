"""Puts this Python process's wall clock FLUX_FILL_TEST_CLOCK_OFFSET_S seconds off: a node of the
fleet whose clock drifted (time.time and time.time_ns; the monotonic clock, which measures
durations, stays true). On the PYTHONPATH of a test's server process only (tests/server/
postgres_cluster.clock_skew_env)."""

import os
import time

_offset = float(os.environ.get("FLUX_FILL_TEST_CLOCK_OFFSET_S") or 0)
if _offset:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _offset
    time.time_ns = lambda: _time_ns() + int(_offset * 1e9)
