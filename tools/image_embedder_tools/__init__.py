"""The user's tools: build an archive, embed a folder, inspect a model, lay out KServe's storage folder.

They run where you build and send, never inside a worker: an archive carries handler/ only.
`image-embedder COMMAND` (cli.py) is the entry point; scripts/ keeps a thin wrapper for each.
What they read at run time (the KServe config) is package data, so an installed wheel works from
any directory.
"""
