"""The benchmark: `image-embedder bench SUITE` (bench.py). Served suites are data (suites.py) run one
way (served.py, framework.py) against in-process limits (limits.py); in-process suites are waits,
decode, options and gpu. The models are examples/custom_model's and examples/resnet's; litserve_peer
is the same job on LitServe. The load test and the soak live in the test kit.
"""
