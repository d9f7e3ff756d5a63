"""What the tests and the bench share, in this checkout: TorchServe launchers, the reference oracle, small helpers.

- checkout: files of this checkout (the example model, the shipped config, the tests' models)
- ts_server: a real TorchServe on free ports; ts_inprocess: TorchServe's Python side in process
- feature_server, kserve_server, example_server: the real servers several test modules share
- reference: independent reference embeddings (shares no code with the engine)
- bodies: request bodies (.npy bytes, encoded images); scripted: answers of a stand-in HTTP server
- imagenet: ImageNet's scale/mean/std; compare: cosine between embeddings; management: list and scale workers
"""
