"""TorchServe adapter for image_embedder: settings from model-config.yaml, one status per request.

TorchServe loads exactly one class from this module, so everything else lives in image_embedder.
"""
from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from typing import Any, Optional, Union

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from image_embedder.encoder import ImageEncoder, resolve_device, threads_per_worker
from image_embedder.errors import RequestError
from image_embedder.image_decoding import ImageDecoder
from image_embedder.request_decoding import (
    DecodedRequest, check_request_limits, decode_multipart, decode_request, request_body,
)
from image_embedder.response_encoding import JSON_TYPE, encode_response
from image_embedder.settings import EncoderSettings

logger = logging.getLogger(__name__)
Decoded = Union[DecodedRequest, RequestError, None]  # None: a describe request


class EmbeddingHandler(BaseHandler):
    """Serves the pooled activations of one layer of a user's model as embeddings."""

    def initialize(self, context: Any) -> None:
        """Load the model named by the archive's `handler:` settings and hook its layer, once."""
        self.context = context
        self.manifest = context.manifest
        properties = context.system_properties
        model_config = getattr(context, "model_yaml_config", None) or {}
        settings = EncoderSettings.from_mapping(model_config.get("handler"))
        self.device = resolve_device(settings.device, properties.get("gpu_id"))
        if settings.num_threads is None and self.device.type == "cpu":
            # Each worker is its own process with torch's default of one thread per core: with
            # maxWorkers of them, give each its share so the workers don't fight over the cores.
            torch.set_num_threads(threads_per_worker(int(model_config.get("maxWorkers") or 1)))
        self.encoder = ImageEncoder(settings, properties.get("model_dir") or ".", self.device)
        self.model = self.encoder.model
        self.image_decoder = ImageDecoder.from_settings(settings)
        self.model_name = context.model_name
        self.initialized = True
        logger.info("image encoder ready: %s; torch threads %d", json.dumps(self.encoder.describe()),
                    torch.get_num_threads())

    # -- request headers -------------------------------------------------------------------
    def _headers(self, idx: int) -> dict[str, Any]:
        try:
            return {str(k).lower(): v for k, v in self.context.get_all_request_header(idx).items()}
        except (AttributeError, IndexError, TypeError):
            return {}

    @staticmethod
    def _content_type(headers: dict[str, Any], row: dict) -> str:
        for name in ("body", "data", *row.keys()):
            part = headers.get(str(name).lower())
            if isinstance(part, dict) and part.get("content-type"):
                return part["content-type"]
        value = headers.get("content-type")
        return value if isinstance(value, str) else ""

    def _header(self, idx: int, name: str) -> Optional[str]:
        value = self._headers(idx).get(name)
        return value if isinstance(value, str) else None

    def _decode(self, idx: int, row: dict) -> DecodedRequest:
        """multipart/form-data: TorchServe hands each part as its own key of `row`, with the part's
        Content-Type in the request headers under the part's name; anything else is one body."""
        headers = self._headers(idx)
        request_type = headers.get("content-type")
        if isinstance(request_type, str) and request_type.lower().startswith("multipart/"):
            parts = []
            for name, value in row.items():
                part = headers.get(str(name).lower())
                parts.append((str(name), value, part.get("content-type", "") if isinstance(part, dict) else ""))
            return decode_multipart(parts, self.image_decoder)
        return decode_request(request_body(row), self._content_type(headers, row), self.image_decoder)

    # -- the three steps ---------------------------------------------------------------------
    def preprocess(self, data: list[dict]) -> list[Decoded]:
        """Decode and check each request on its own: a bad one becomes its RequestError."""
        s = self.encoder.settings
        decoded: list[Decoded] = []
        self.image_decoder.prefetch(data)  # this batch's PNG/JPEGs decode in parallel from here on
        for idx, row in enumerate(data):
            if str(self._header(idx, "describe")).lower() == "true":
                decoded.append(None)
                continue
            try:
                request = self._decode(idx, row or {})
                check_request_limits(request, s.max_images_per_request, s.max_batch_pixels)
                decoded.append(request)
            except RequestError as exc:
                decoded.append(exc)
            except Exception as exc:  # a decoder bug must still cost only this request
                logger.exception("decoding request %d failed", idx)
                decoded.append(RequestError(500, "InternalError", f"decoding failed: {type(exc).__name__}: {exc}"))
        return decoded

    def inference(self, decoded: list[Decoded], *args: Any, **kwargs: Any) -> list[Union[np.ndarray, RequestError, None]]:
        """Embed all good requests together; errors and describe requests pass through untouched."""
        good = [i for i, d in enumerate(decoded) if isinstance(d, DecodedRequest)]
        results: list[Union[np.ndarray, RequestError, None]] = list(decoded)  # type: ignore[arg-type]
        embedded = self.encoder.embed_requests([decoded[i].images for i in good])  # type: ignore[union-attr]
        for i, result in zip(good, embedded):
            results[i] = result
        return results

    def postprocess(self, results: list[Union[np.ndarray, RequestError, None]], decoded: list[Decoded]) -> list[bytes]:
        """Serialize each answer once and set its status and Content-Type."""
        out = []
        for idx, result in enumerate(results):
            if isinstance(result, RequestError):
                out.append(self._error(idx, result))
                continue
            if result is None:
                self.context.set_response_content_type(idx, JSON_TYPE)
                out.append(json.dumps(self.encoder.describe(), separators=(",", ":")).encode("utf-8"))
                continue
            body, content_type = encode_response(result, decoded[idx], self.model_name, self._header(idx, "accept"))
            self.context.set_response_content_type(idx, content_type)
            out.append(body)
        return out

    def _error(self, idx: int, error: RequestError) -> bytes:
        try:
            phrase = HTTPStatus(error.status).phrase
        except ValueError:
            phrase = error.kind
        self.context.set_response_status(error.status, phrase, idx)
        self.context.set_response_content_type(idx, JSON_TYPE)
        return error.to_json().encode("utf-8")

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        """One TorchServe batch: decoded, embedded together, each request answered on its own."""
        self.context = context
        start = time.perf_counter()
        decoded = self.preprocess(data)
        forward_start = time.perf_counter()
        results = self.inference(decoded)
        forward_ms = (time.perf_counter() - forward_start) * 1000
        out = self.postprocess(results, decoded)
        self._record_metrics(decoded, forward_ms, (time.perf_counter() - start) * 1000, results)
        return out

    def _record_metrics(self, decoded: list[Decoded], forward_ms: float, total_ms: float, results: list) -> None:
        """Per TorchServe batch: images embedded and requests refused (counters), images per request,
        requests per batch, forward and handler-overhead times (gauges). Prometheus shows them when
        model_metrics_auto_detect=true (config.properties)."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            from ts.metrics.metric_type_enum import MetricTypes

            served = [d.count for d, r in zip(decoded, results) if isinstance(d, DecodedRequest) and isinstance(r, np.ndarray)]
            refused = sum(isinstance(r, RequestError) for r in results)
            metrics.add_time("HandlerTime", round(total_ms, 2), None, "ms")
            metrics.add_counter("ImagesEmbedded", sum(served), None)
            metrics.add_counter("RequestsRefused", refused, None)
            gauge = MetricTypes.GAUGE
            if served:
                metrics.add_metric("ImagesPerRequest", sum(served) / len(served), "count", None, [], gauge)
            metrics.add_metric("RequestsPerBatch", len(decoded), "count", None, [], gauge)
            metrics.add_metric("ForwardTime", round(forward_ms, 3), "ms", None, [], gauge)
            metrics.add_metric("HandlerOverhead", round(max(0.0, total_ms - forward_ms), 3), "ms", None, [], gauge)
        except Exception:  # metrics must never fail a request
            logger.debug("recording metrics failed", exc_info=True)
