"""bench/front_overhead.py runs: the front streams every one-token response of the stand-in Triton
(plus the usage chunk), and the straight gRPC path gets them all too."""
from bench import front_overhead


def test_front_overhead_bench_counts_every_chunk():
    front, grpc = front_overhead.main(["--concurrency", "4", "--requests", "8", "--tokens", "5"])
    assert front["chunks"] == 8 * (5 + 1) and grpc["chunks"] == 8 * 5
    # CPU is read in clock ticks (10 ms): a run this short may show none
    assert front["front_cpu_us_per_chunk"] >= 0 and grpc["stand_in_cpu_us_per_chunk"] >= 0
