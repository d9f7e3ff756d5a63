"""`image-embedder`: one command for the project's tools.

    image-embedder build   --model-file m.py --model-class Net --state-dict w.pth --layer layer4
    image-embedder embed   images/ --url http://127.0.0.1:8080 --model encoder --key-file key_file.json
    image-embedder search  out/store query.png -k 10 --key-file key_file.json
    image-embedder inspect --model-file m.py --model-class Net --input-shape 3,224,224
    image-embedder kserve-layout model_store/encoder.mar out/kserve
    image-embedder bench layouts --plot out/layouts.png
    image-embedder load-test --duration 30
    image-embedder soak --minutes 60 --plot out/soak.png

`image-embedder COMMAND --help` shows a command's options. Each command is also a script in
scripts/ (scripts/build_mar.py, ...), kept for the commands the docs show. A command's module is
imported only when it runs: the bench commands need this checkout's bench package, the others not.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from typing import Optional, Sequence

COMMANDS = {
    "build": "image_embedder_tools.build",
    "embed": "image_embedder_tools.embed",
    "search": "image_embedder_tools.search",
    "inspect": "image_embedder_tools.inspect_model",
    "kserve-layout": "image_embedder_tools.kserve_layout",
    "bench": "image_embedder_bench.bench",
    "load-test": "image_embedder_testkit.load_test",
    "soak": "image_embedder_testkit.soak",
}


def summary(module_name: str) -> str:
    """The first line of a command module's docstring, read from its source (nothing is imported)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        return f"(not installed: {module_name})"
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, module in COMMANDS.items():
            print(f"  {name:16} {summary(module)}")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"image-embedder: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"image-embedder {command}"  # argparse's prog in the command's usage line
    return importlib.import_module(COMMANDS[command]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
