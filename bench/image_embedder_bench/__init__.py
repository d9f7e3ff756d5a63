"""Benchmarks and the load test, run from this checkout against the engine and a real TorchServe.

bench (cases / measure / report), bench_breakdown, bench_threads, gpu_bench, load_test; each is an
`image-embedder` command and a script in scripts/. Models and photos are made on the spot
(bench_models, bench_photos); bench_client holds the HTTP clients.
"""
