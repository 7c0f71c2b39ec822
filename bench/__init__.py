"""Benchmarks of the cluda kernels. Run from the repository root, e.g.
`python -m bench.bench_pixel_infonce --quick`; results land in `bench/results/`."""
