"""``device_idle`` against a brute-force recount on a microsecond grid: overlapping kernels (two streams)
are one busy stretch, and only gaps of at least the threshold count."""
import random

from aphrodite.worker.profiler import device_idle


def _grid_idle(intervals: list[tuple[int, int]], min_gap: int) -> tuple[int, int]:
    busy = set()
    for a, b in intervals:
        busy.update(range(a, b))
    first, last = min(a for a, _ in intervals), max(b for _, b in intervals)
    idle, gaps, run = 0, 0, 0
    for t in range(first, last + 1):
        if t in busy or t == last:
            if run >= min_gap:
                idle, gaps = idle + run, gaps + 1
            run = 0
        else:
            run += 1
    return idle, gaps


def test_device_idle_matches_a_grid_recount():
    rng = random.Random(0)
    for _ in range(200):
        intervals = []
        for _ in range(rng.randint(1, 12)):
            a = rng.randint(0, 400)
            intervals.append((a, a + rng.randint(1, 60)))
        min_gap = rng.choice([1, 5, 20, 50])
        idle_s, gaps = device_idle(intervals, min_gap)
        assert (round(idle_s * 1e6), gaps) == _grid_idle(intervals, min_gap)


def test_overlapping_streams_leave_no_gap():
    assert device_idle([(0, 100), (50, 120), (120, 130)], 1) == (0.0, 0)
    idle_s, gaps = device_idle([(0, 10), (200, 210), (60, 70)], 50)    # gaps of 50 and 130 us
    assert (round(idle_s * 1e6), gaps) == (180, 2)
    assert device_idle([(0, 10), (59, 70)], 50) == (0.0, 0)
