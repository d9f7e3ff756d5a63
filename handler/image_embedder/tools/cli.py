"""`image-embedder`: one command for the project's tools.

    image-embedder build   --model-file m.py --model-class Net --state-dict w.pth --layer layer4
    image-embedder embed   images/ --url http://127.0.0.1:8080 --model encoder --key-file key_file.json
    image-embedder inspect --model-file m.py --model-class Net --input-shape 3,224,224
    image-embedder kserve-layout model_store/encoder.mar out/kserve
    image-embedder bench --quick
    image-embedder load-test --duration 30

`image-embedder COMMAND --help` shows a command's options. Each command is also a script in
scripts/ (scripts/build_mar.py, ...), kept for the commands the docs show.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "build": "image_embedder.tools.build",
    "embed": "image_embedder.tools.embed",
    "inspect": "image_embedder.tools.inspect_model",
    "kserve-layout": "image_embedder.tools.kserve_layout",
    "bench": "image_embedder.tools.bench",
    "load-test": "image_embedder.tools.load_test",
}


def summary(module_name: str) -> str:
    """The first line of a command module's docstring."""
    doc = importlib.import_module(module_name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, module in COMMANDS.items():
            print(f"  {name:14} {summary(module)}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"image-embedder: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"image-embedder {command}"  # argparse's prog in the command's usage line
    return importlib.import_module(COMMANDS[command]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
