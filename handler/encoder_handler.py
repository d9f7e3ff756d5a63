"""TorchServe adapter for image_embedder: settings from model-config.yaml, one status per request.

TorchServe loads exactly one class from this module, so everything else lives in image_embedder.

What it takes from BaseHandler: the initialize / preprocess / inference / postprocess names and meanings,
`self.context` / `self.manifest` / `self.initialized`, and TorchServe's `@timed` on the three steps
(`profile: true` under `handler:` in model-config.yaml logs their times, as for any TorchServe handler).
What it does not: BaseHandler.initialize loads `serializedFile` itself and `handle` runs one body through
the model; here the model is loaded from the `handler:` settings by the engine, and `handle` answers
each request of a batch on its own (status, content type, headers).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
from http import HTTPStatus
from typing import Any, Optional, Union

import numpy as np
import torch
from ts.handler_utils.timer import timed
from ts.torch_handler.base_handler import BaseHandler

from image_embedder.allocator import reuse_freed_memory
from image_embedder.encoder import ImageEncoder, resolve_device
from image_embedder.errors import RequestError, as_answer
from image_embedder.image_decoding import ImageDecoder
from image_embedder.request_decoding import Decoded, DecodedRequest, Describe, Refusal, accepted_content_types, decode_batch
from image_embedder.response_encoding import BatchResults, EncodedResponse
from image_embedder.settings import EncoderSettings
from image_embedder.thread_wait import spinning_threads_warning
from image_embedder.wire import PLAIN
from image_embedder.worker_threads import CoreShare, available_cores

logger = logging.getLogger(__name__)


Result = Union[np.ndarray, Refusal, Describe]


REQUEST_ID = re.compile(r"[\w.:-]{1,128}")  # what the client sends: uuid hex; anything else is not echoed


def _request_id(headers: dict[str, Any]) -> Optional[str]:
    """The request's `Client-Request-Id`, to echo on its answer: a client that reads another request's answer
    on a keep-alive connection (TorchServe can answer a job twice after a scale-down) can tell."""
    value = headers.get("client-request-id")
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    return value if isinstance(value, str) and REQUEST_ID.fullmatch(value) else None


def _request_headers(context: Any, idx: int) -> dict[str, Any]:
    """One request's headers, names lower-cased; multipart parts appear under their part name as dicts."""
    try:
        return {str(k).lower(): v for k, v in context.get_all_request_header(idx).items()}
    except (AttributeError, IndexError, TypeError):
        return {}


class EmbeddingHandler(BaseHandler):
    """Serves the pooled activations of one layer of a user's model as embeddings."""

    def initialize(self, context: Any) -> None:
        """Load the model named by the archive's `handler:` settings and hook its layer, once."""
        self.context = context
        self.manifest = context.manifest
        properties = context.system_properties
        model_config = getattr(context, "model_yaml_config", None) or {}
        settings = EncoderSettings.from_mapping(model_config.get("handler"))
        # before the decode and torch threads allocate
        line = reuse_freed_memory(settings.reuse_freed_memory)
        if line:
            logger.info(line)
        self.device = resolve_device(settings.device, properties.get("gpu_id"))
        model_dir = properties.get("model_dir") or "."
        self.cores: Optional[CoreShare] = None
        if settings.num_threads is None and self.device.type == "cpu":
            # Workers are processes that come and go with scaling: each takes its share of the cores
            # among the workers computing at the moment, before every forward pass.
            try:
                self.cores = CoreShare()
                self.cores.refresh()
                spinning = spinning_threads_warning(self.cores.live_workers())
                if spinning:
                    logger.warning(spinning)
            except OSError as exc:  # no writable temporary folder: a fixed share, from maxWorkers
                workers = int(model_config.get("maxWorkers") or available_cores())
                logger.warning("cannot share the cores (%s); torch threads fixed at cores // %d workers", exc, workers)
                torch.set_num_threads(max(1, available_cores() // workers))
        self.encoder = ImageEncoder(settings, model_dir, self.device)
        self.model = self.encoder.model
        self.image_decoder = ImageDecoder.from_settings(settings)
        if self.cores is not None:  # sized before every pass; decoding as many at once as torch threads
            self.encoder.before_pass = self.cores.refresh
            self.image_decoder.budget = torch.get_num_threads
        self.decodes_images = importlib.util.find_spec("PIL") is not None  # else images get 415
        self.model_name = context.model_name
        # the archive's version (`build --version`), as TorchServe routes /predictions/<name>/<version>
        self.model_version = ((self.manifest or {}).get("model") or {}).get("modelVersion")
        self.initialized = True
        logger.info("image encoder ready: %s", json.dumps(self.describe()))

    def describe(self) -> dict:
        """The archive's version, the engine's description, what this server accepts, and this worker's
        process and threads."""
        return {
            "model_version": self.model_version,
            **self.encoder.describe(),
            "content_types": accepted_content_types(self.decodes_images),
            "worker": {"pid": os.getpid(), "torch_threads": torch.get_num_threads(), "cores": available_cores(),
                       "busy_workers": self.cores.busy_workers if self.cores is not None else None},
        }

    # -- the three steps ---------------------------------------------------------------------
    @timed
    def preprocess(self, data: list[dict]) -> list[Decoded]:
        """Decode and check each request on its own: a bad one becomes its RequestError."""
        headers = [_request_headers(self.context, idx) for idx in range(len(data))]
        return decode_batch(data, headers, self.image_decoder, self.encoder.settings)

    @timed
    def inference(self, data: list[Decoded], *args: Any, **kwargs: Any) -> BatchResults:
        """Embed all good requests together; refusals and describe requests pass through untouched.
        The results carry the decoded requests, which postprocess answers each in its wire format."""
        good = [(i, d) for i, d in enumerate(data) if isinstance(d, DecodedRequest)]
        results: list[Result] = list(data)
        if good:
            embedded = self.encoder.embed_requests([d.images for _, d in good])
            for (i, request), result in zip(good, embedded):
                if not isinstance(result, RequestError):
                    try:
                        result = self.encoder.shape(result, request.output)
                    except RequestError as exc:
                        result = as_answer(exc)
                results[i] = Refusal(result, request.wire) if isinstance(result, RequestError) else result
        return BatchResults(results, data)

    @timed
    def postprocess(self, data: BatchResults) -> list[bytes]:
        """Serialize each answer once and set its status, Content-Type and headers."""
        out = []
        for idx, (result, request) in enumerate(zip(data, data.requests)):
            if isinstance(result, Refusal):
                answer = self._refuse(idx, result)
            elif isinstance(result, Describe):
                answer = (result.wire or PLAIN).describe(self.describe(), self.model_name)
            else:
                answer = request.wire.encode(result, request, self.model_name)
            self.context.set_response_content_type(idx, answer.content_type)
            for name, value in answer.headers.items():  # TorchServe passes these through to the client
                self.context.set_response_header(idx, name, value)
            request_id = _request_id(_request_headers(self.context, idx))
            if request_id:
                self.context.set_response_header(idx, "Client-Request-Id", request_id)
            out.append(answer.body)
        return out

    def _refuse(self, idx: int, refusal: Refusal) -> EncodedResponse:
        error = refusal.error
        try:
            phrase = HTTPStatus(error.status).phrase
        except ValueError:
            phrase = error.kind
        self.context.set_response_status(error.status, phrase, idx)
        return refusal.wire.refuse(error)

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        """One TorchServe batch: decoded, embedded together, each request answered on its own."""
        self.context = context
        with self.cores.busy() if self.cores is not None else contextlib.nullcontext():
            start = time.perf_counter()
            decoded = self.preprocess(data)
            forward_start = time.perf_counter()
            results = self.inference(decoded)
            forward_ms = (time.perf_counter() - forward_start) * 1000
            out = self.postprocess(results)
            self._record_metrics(decoded, forward_ms, (time.perf_counter() - start) * 1000, results)
        return out

    def _record_metrics(self, decoded: list[Decoded], forward_ms: float, total_ms: float, results: list[Result]) -> None:
        """Per TorchServe batch: images per request, requests per batch, forward and handler-overhead
        times (gauges), handler time, requests refused and images embedded (counters). Prometheus
        shows them when model_metrics_auto_detect=true (config.properties).

        Each metric is one log line that the frontend reads in order, so ImagesEmbedded goes last:
        a reader that sees a batch's count sees every other value of that same batch."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            from ts.metrics.metric_type_enum import MetricTypes

            served = [d.count for d, r in zip(decoded, results) if isinstance(d, DecodedRequest) and isinstance(r, np.ndarray)]
            refused = sum(isinstance(r, Refusal) for r in results)
            gauge = MetricTypes.GAUGE
            if served:
                metrics.add_metric("ImagesPerRequest", sum(served) / len(served), "count", None, [], gauge)
            metrics.add_metric("RequestsPerBatch", len(decoded), "count", None, [], gauge)
            metrics.add_metric("ForwardTime", round(forward_ms, 3), "ms", None, [], gauge)
            metrics.add_metric("HandlerOverhead", round(max(0.0, total_ms - forward_ms), 3), "ms", None, [], gauge)
            metrics.add_time("HandlerTime", round(total_ms, 3), None, "ms")
            metrics.add_counter("RequestsRefused", refused, None)
            metrics.add_counter("ImagesEmbedded", sum(served), None)  # last: see the docstring
        except Exception:  # metrics must never fail a request
            logger.debug("recording metrics failed", exc_info=True)
