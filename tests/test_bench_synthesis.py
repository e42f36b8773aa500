"""The synthesis benchmark runs both modes and prints its compute floor (tiny crop, CPU)."""

from benchmarks import bench_synthesis


def test_bench_synthesis_prints_times_and_the_compute_floor(capsys):
    argv = ["--spacing_mm", "8", "--repeats", "1", "--threads", "1", "--batch_slices", "0", "1", "--flops"]
    assert bench_synthesis.main(argv) == 0
    out = capsys.readouterr().out
    assert "batched:" in out and "one slice:" in out and "faster than one slice" in out
    floors = [line for line in out.splitlines() if "compute floor" in line]
    assert len(floors) == 2  # one per mode
    # the same slices are synthesised either way, so the FLOPs per vertebra agree to within the
    # fine decoder's row window (per slice, or the union over a pass)
    gflop = [float(line.split(": ", 1)[1].split(" GFLOP per vertebra")[0]) for line in floors]
    assert all(g > 0 for g in gflop) and abs(gflop[0] - gflop[1]) <= 0.25 * max(gflop)
