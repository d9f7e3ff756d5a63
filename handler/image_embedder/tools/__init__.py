"""The project's tools: build an archive, embed a folder, inspect a model, benchmark, load-test.

They run beside TorchServe, never inside a worker: the archive leaves this package out.
`image-embedder COMMAND` (tools/cli.py) is the entry point; scripts/ keeps a thin wrapper for each.
"""
