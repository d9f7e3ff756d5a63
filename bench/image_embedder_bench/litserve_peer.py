"""The same job written as a LitServe user would, to measure beside ours (an optional extra:
`.venv/bin/python -m pip install litserve==0.2.19`).

LitServe's defaults: one worker that keeps torch's default threads (every core), dynamic batching of
up to 16 requests waiting at most 20 ms. The layer's output is taken by a forward hook that stops the
forward pass (the user's early exit), pooled by the mean over space. Requests are JSON: a base64 `.npy`
array (`{"npy": ...}`) or base64 JPEGs (`{"jpegs": [...]}`, decoded, resized and cropped with Pillow
one after another, as decode_request runs), and the answer is `{"embeddings": [[...], ...]}`.

    python -m image_embedder_bench.litserve_peer --port 8000 --model-file m.py --model-class Net \\
        --state-dict w.pth --layer layer4 --settings '{"scale": 0.0039, "mean": [...], "std": [...]}'
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import sys

import litserve as ls
import numpy as np
import torch
from PIL import Image

BATCH, TIMEOUT_S = 16, 0.02


class _Stop(BaseException):
    pass


class EmbeddingAPI(ls.LitAPI):
    """setup -> decode_request -> batch -> predict -> unbatch -> encode_response, LitServe's way."""

    def __init__(self, model_file: str, model_class: str, state_dict: str, layer: str, settings: dict) -> None:
        super().__init__(max_batch_size=BATCH, batch_timeout=TIMEOUT_S)
        self.files = (model_file, model_class, state_dict, layer)
        self.settings = settings

    def setup(self, device):
        model_file, model_class, state_dict, layer = self.files
        spec = importlib.util.spec_from_file_location("peer_model", model_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.model = getattr(module, model_class)().eval()
        self.model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
        self.features = None

        def hook(_module, _inputs, output):
            self.features = output
            raise _Stop()

        dict(self.model.named_modules())[layer].register_forward_hook(hook)
        s = self.settings
        self.scale = s.get("scale")
        self.mean = torch.tensor(s["mean"]).view(1, -1, 1, 1) if s.get("mean") else None
        self.std = torch.tensor(s["std"]).view(1, -1, 1, 1) if s.get("std") else None

    def _photo(self, data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        shorter = self.settings.get("resize")
        if shorter:
            w, h = image.size
            image = image.resize((round(w * shorter / min(w, h)), round(h * shorter / min(w, h))), Image.BILINEAR)
        crop = self.settings.get("center_crop")
        if crop:
            w, h = image.size
            left, top = (w - crop) // 2, (h - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        return np.asarray(image).transpose(2, 0, 1)

    def decode_request(self, request):
        if "npy" in request:
            array = np.load(io.BytesIO(base64.b64decode(request["npy"])), allow_pickle=False)
            return torch.from_numpy(array if array.ndim == 4 else array[None])
        return torch.from_numpy(np.stack([self._photo(base64.b64decode(j)) for j in request["jpegs"]]))

    def batch(self, inputs):
        return inputs  # requests of several images each: kept apart, joined in predict

    def predict(self, x):
        x = x if isinstance(x, list) else [x]
        sizes = [len(t) for t in x]
        batch = torch.cat(x).float()
        if self.scale:
            batch.mul_(self.scale)
        if self.mean is not None:
            batch.sub_(self.mean)
        if self.std is not None:
            batch.div_(self.std)
        with torch.inference_mode():
            try:
                self.model(batch)
            except _Stop:
                pass
        f = self.features
        pooled = f.mean(dim=tuple(range(2, f.dim()))) if f.dim() > 2 else f
        return list(torch.split(pooled, sizes))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        if isinstance(output, list):  # a lone request's answer
            output = output[0]
        return {"embeddings": output.tolist()}


def request_body(array: np.ndarray | None = None, jpegs: tuple = ()) -> bytes:
    """A request as this peer's client sends it."""
    if array is not None:
        from image_embedder_testkit.bodies import npy_bytes

        return json.dumps({"npy": base64.b64encode(npy_bytes(array)).decode()}).encode()
    return json.dumps({"jpegs": [base64.b64encode(j).decode() for j in jpegs]}).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-file", required=True)
    parser.add_argument("--model-class", required=True)
    parser.add_argument("--state-dict", required=True)
    parser.add_argument("--layer", required=True)
    parser.add_argument("--settings", help="JSON: scale, mean, std, resize, center_crop")
    args = parser.parse_args(argv)
    api = EmbeddingAPI(args.model_file, args.model_class, args.state_dict, args.layer, json.loads(args.settings or "{}"))
    server = ls.LitServer(api, accelerator="cpu")
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
