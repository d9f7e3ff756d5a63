"""The OpenAI-style embeddings API, for images: what the `openai` SDK, LangChain's OpenAIEmbeddings and
LlamaIndex send to `{base_url}/embeddings` (OpenAI's API reference, "Create embeddings").

With `base_url = http://HOST:8080/predictions/<model>/<version>/v1`, TorchServe routes
`POST .../v1/embeddings` to the handler and hands it the path after the version as the `url_path`
header; the same body posted to /predictions/<model> is read the same way (its `input` key says so).

Request: `{"input": str | [str, ...], "model"?: str, "encoding_format"?: "float" | "base64",
"dimensions"?: int, "user"?: str, "modality"?: "image"}` (Infinity's `modality`; `dimensions` keeps the
first k, output_options). Each `input` item is one image: a data
URL (`data:image/png;base64,...`, `image/jpeg`, `application/x-npy`) or the bare base64 of a PNG,
JPEG or .npy file. Any other URL is refused unread: the server fetches nothing a request names.
Answer: `{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}],
"model": ..., "usage": {"prompt_tokens": 0, "total_tokens": 0}}`: one embedding per item, in order;
`base64` is each embedding's little-endian bytes (float32 unless the `Embedding-Dtype` header asks
otherwise; the SDK asks for base64 by default and decodes float32);
images have no tokens, so usage is zero. Errors: `{"error": {"message", "type", "param", "code"}}`,
`code` being this server's error type (docs/api.md#errors).
"""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Optional

import numpy as np

from ..decoded_request import DecodedRequest, DecodeImage, Describe, base64_bytes, check_images, decode_image
from ..errors import RequestError, bad_request
from ..npy_codec import NPY_MAGIC, read_npy
from ..output_options import OutputOptions, parse_dimensions
from .base import JSON_TYPE, Body, EncodedResponse, WireFormat, json_answer

ROUTES = ("v1/embeddings", "embeddings")
MODELS_ROUTES = ("v1/models", "models")
ENCODINGS = ("float", "base64")
KIND = "InvalidOpenAIRequest"
PARAMS = re.compile(r"(input|model|encoding_format|dimensions|modality|user)\b")


class OpenAIEmbeddings(WireFormat):
    name = "openai"

    def matches(self, body: Body) -> bool:
        if body.url_path in ROUTES + MODELS_ROUTES:
            return True
        doc = body.json_object()
        return doc is not None and "input" in doc

    def decode(self, body: Body, image_decoder: Optional[DecodeImage]) -> DecodedRequest | Describe:
        if body.url_path in MODELS_ROUTES:
            return Describe(self)
        if body.empty:
            raise bad_request("request body is empty; send a JSON body with \"input\"", "EmptyBody")
        doc = body.json()
        if not isinstance(doc, dict) or "input" not in doc:
            keys = sorted(doc)[:10] if isinstance(doc, dict) else type(doc).__name__
            raise bad_request(f'the body must be a JSON object with "input" (a list of images), got {keys}', KIND)
        encoding = doc.get("encoding_format") or "float"
        if encoding not in ENCODINGS:
            raise bad_request(f"encoding_format {encoding!r} is not supported; use one of {list(ENCODINGS)}", KIND)
        if doc.get("modality", "image") != "image":
            raise bad_request(f"modality {doc['modality']!r} is not served; this model embeds images", KIND)
        model = doc.get("model")
        output = OutputOptions(dimensions=parse_dimensions(doc.get("dimensions"), "dimensions"))
        images = [_image(item, f"input[{i}]", image_decoder) for i, item in enumerate(_items(doc["input"]))]
        return DecodedRequest(images, self, options={"encoding_format": encoding,
                                                     "model": model if isinstance(model, str) else None}, output=output)

    def answer(self, embeddings: np.ndarray, request: DecodedRequest, model_name: str) -> EncodedResponse:
        as_base64 = request.options.get("encoding_format") == "base64"
        little = embeddings.dtype.newbyteorder("<")
        rows = [base64.b64encode(row.astype(little).tobytes()).decode("ascii") if as_base64 else row.tolist()
                for row in embeddings]
        return json_answer({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "model": request.options.get("model") or model_name,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        })

    def refuse(self, error: RequestError) -> EncodedResponse:
        param = PARAMS.match(error.message)
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
        doc = {"error": {"message": error.message, "type": kind, "param": param.group(1) if param else None,
                         "code": error.kind}}
        return EncodedResponse(json.dumps(doc).encode("utf-8"), JSON_TYPE)

    def describe(self, description: dict, model_name: str) -> EncodedResponse:
        """`GET v1/models`: this model, as OpenAI lists one."""
        return json_answer({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "image-embedder"}]})


def _items(value: Any) -> list[str]:
    """`input` as a non-empty list of strings (a string alone is one item)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise bad_request("input must be a non-empty list of images (data URLs or base64 strings)", KIND)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise bad_request(
                f"input[{i}] is a {type(item).__name__}; each item is one image as a data URL or base64 string "
                "(token ids are not read: this model embeds images)", KIND)
    return items


def _image(item: str, where: str, image_decoder: Optional[DecodeImage]) -> np.ndarray:
    """One input item: a data URL or bare base64 of a PNG, JPEG or .npy file, as one (1, C, H, W) batch."""
    media_type = ""
    if item.startswith("data:"):
        header, comma, _ = item.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_request(f"{where} is a data URL without ';base64,'; send data:<type>;base64,<data>", KIND)
        media_type = header[len("data:"):-len(";base64")].lower()
    try:
        data = base64_bytes(item, where)
    except RequestError as exc:
        if exc.kind != "InvalidBase64":
            raise
        raise bad_request(
            f"{where} is neither a data URL nor the base64 of an image ({item[:40]!r}): this model embeds images, "
            "not text", "InvalidBase64") from None
    if data[:6] == NPY_MAGIC:
        batch = check_images(read_npy(data), where)
    else:
        [batch] = decode_image(data, media_type, where, image_decoder)
    if len(batch) != 1:
        raise bad_request(f"{where} holds {len(batch)} images; each input item is one image (one embedding each)", KIND)
    return batch
