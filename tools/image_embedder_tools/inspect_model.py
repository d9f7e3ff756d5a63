"""Find the layer to tap: one forward pass with hooks on every submodule, printed as a table.

    python scripts/inspect_model.py --model-file model.py --model-class CustomModel --input-shape 3,224,224

Columns: dotted name (what --layer / layer_name takes), module type, output shape for a batch of
one, and the embedding size pooling avg / max / gem / cls / none would give ('-': not applicable).
Hooks see what really runs, so models torch.fx cannot trace work too. Weights don't change shapes,
so --state-dict is optional.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from image_embedder.errors import ConfigError
from image_embedder.layer_table import ForwardFailed, format_table, layer_table
from image_embedder.loading import load_model
from image_embedder_tools.cli_args import add_weights_arguments, parse_kwargs, parse_shape, unwrap_options


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-file", required=True, help="the .py file that defines the model")
    parser.add_argument("--model-class", required=True, help="class or factory function in that file")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object passed to the class or factory")
    parser.add_argument("--state-dict", help="optional weights (shapes don't depend on them); checkpoints as for build_mar.py")
    parser.add_argument("--input-shape", required=True, help="one image's shape, C,H,W (e.g. 3,224,224)")
    parser.add_argument("--channel-axis", type=int, default=1, help="channel axis of feature maps (-1: channels-last)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    add_weights_arguments(parser)
    args = parser.parse_args(argv)
    try:
        kwargs = parse_kwargs(args.model_kwargs)
        model = load_model(args.model_file, args.model_class, args.state_dict, kwargs, "cpu",
                           unwrap_options=unwrap_options(args))
        rows = layer_table(model, parse_shape(args.input_shape), args.channel_axis)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ForwardFailed as exc:  # the model's forward refused the input shape: show how far it got
        print(f"error: the forward pass on shape {args.input_shape} failed {exc.where(type(model).__name__)}: {exc}",
              file=sys.stderr)
        if exc.ran:
            print(f"layers that ran before it ({len(exc.ran)}, in order; the last ones are where to look):",
                  file=sys.stderr)
            print(format_table(exc.ran), file=sys.stderr)
        else:
            print("no layer ran before it", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"name": r.name, "type": r.module_type, "shape": list(r.shape) if r.shape else None,
                           "sizes": r.sizes, "note": r.note} for r in rows]))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
