from benchmarks.timing import median_seconds


def test_median_seconds_calls_warmup_plus_repeats_and_returns_the_median(monkeypatch):
    calls = []
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three timed calls: 1 s, 3 s, 2 s
    monkeypatch.setattr("benchmarks.timing.time.perf_counter", lambda: next(clock))
    assert median_seconds(lambda: calls.append(1), repeats=3, warmup=2) == 2.0
    assert len(calls) == 5
