"""Encoded images (PNG, JPEG) to uint8 (1, C, H, W) arrays, prepared as the archive's settings say.

Order, as torchvision's usual `Resize -> CenterCrop -> ToTensor -> Normalize` with a loader that
converts to RGB: decode, apply the EXIF orientation, convert to RGB or L, resize the shorter side
(bilinear), center-crop, then HWC -> CHW uint8. `scale`, `mean` and `std` are applied later, in
float32, by the encoder (ImageEncoder._normalize), exactly as for arrays.

Speed without changing the answer: nothing is converted to float here, no copy is made when
there is nothing to turn or convert, and the images of a whole TorchServe batch are decoded by a
thread pool (`prefetch`: Pillow releases the GIL while decoding and resizing). Two options trade
exactness for speed (off by default; docs/performance.md gives their accuracy): `exact_resize:
false` resizes only the window the crop keeps (Pillow's `box`), and `jpeg_draft` lets libjpeg
decode at 1/2, 1/4 or 1/8 scale when the resize allows it (a 1920x1080 photo resized to 256
needs a quarter of the DCT work).

Pillow is imported only when an image arrives, so an archive that never sees one serves on a
Python without Pillow.
"""
from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .decoded_request import images_unsupported
from .errors import RequestError, as_answer, bad_request
from .worker_threads import available_cores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_CONTENT_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/pjpeg": "JPEG"}
FORMATS = ("PNG", "JPEG")
EXIF_ORIENTATION = 0x0112
SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


def sniff_format(body: bytes | bytearray) -> Optional[str]:
    """'PNG' or 'JPEG' from the first bytes, else None."""
    head = bytes(body[:8])
    if head.startswith(PNG_MAGIC):
        return "PNG"
    if head.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


def color_mode_for(color_mode: str, input_shape: Optional[Sequence[int]]) -> str:
    """The Pillow mode images are converted to: the setting, or for 'auto' the model's channel count."""
    if color_mode != "auto":
        return color_mode
    if input_shape and len(input_shape) == 3 and input_shape[0] == 1:
        return "L"
    return "RGB"


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(w, h) with the shorter side `shorter` and the aspect ratio kept (torchvision's rounding down)."""
    if width <= height:
        return shorter, max(1, int(shorter * height / width))
    return max(1, int(shorter * width / height)), shorter


def crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the central size x size window (torchvision's rounding)."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window of an HWC array, zero-padded first if the image is smaller."""
    height, width = array.shape[:2]
    if height < size or width < size:
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        pads = [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)] + [(0, 0)] * (array.ndim - 2)
        array = np.pad(array, pads)
        height, width = array.shape[:2]
    left, top = crop_offsets(width, height, size)
    return array[top: top + size, left: left + size]


def default_decode_threads() -> int:
    """At most one decoding thread per core this process may use (`decode_threads` sets it); how
    many decode at once is the worker's share of the cores at that batch (see `budget`)."""
    return available_cores()


@dataclass(eq=False)
class ImageDecoder:
    """Callable `(body, content_type) -> [uint8 (1, C, H, W)] | None`: None when the body is no image.

    Its options are plain data (`from_settings` reads them from the archive's settings): `mode` the
    Pillow mode images become, `resize` the shorter side, `crop` the centered square; `max_pixels`
    None means Pillow's own Image.MAX_IMAGE_PIXELS; `threads` sizes the pool that `prefetch` uses
    (1: everything in the caller's thread), and `budget`, when set, caps how many of them decode at
    once (the worker's share of the cores now, as for its torch threads); `jpeg_draft` allows DCT scaling; `exact_resize` False
    resizes only the window the crop keeps (same sampling positions, but float rounding moves a few
    pixels by one grey level: docs/performance.md).
    """

    mode: str = "RGB"
    resize: Optional[int] = None
    crop: Optional[int] = None
    max_pixels: Optional[int] = None
    threads: int = 1
    jpeg_draft: bool = False
    exact_resize: bool = True
    budget: Optional[Callable[[], int]] = field(default=None, repr=False)
    _pool: Optional[ThreadPoolExecutor] = field(default=None, init=False, repr=False)
    # id(body) -> (body, its decode), for the batch `prefetch` started
    _pending: dict[int, tuple[Any, Future]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.threads = max(1, self.threads)

    @classmethod
    def from_settings(cls, settings: Any) -> "ImageDecoder":
        """The decoder an archive's EncoderSettings ask for."""
        return cls(
            mode=color_mode_for(settings.color_mode, settings.input_shape),
            resize=settings.resize,
            crop=settings.center_crop,
            max_pixels=settings.max_image_pixels,
            threads=settings.decode_threads or default_decode_threads(),
            jpeg_draft=settings.jpeg_draft,
            exact_resize=settings.exact_resize,
        )

    def __call__(self, body: Any, content_type: str = "") -> Optional[list[np.ndarray]]:
        content_type = (content_type or "").split(";")[0].strip().lower()
        if not isinstance(body, (bytes, bytearray)):
            return None
        pending = self._pending.pop(id(body), None)
        if pending is not None and pending[0] is body:
            return [pending[1].result()]  # decoded ahead by `prefetch`; its RequestError re-raises here
        fmt = sniff_format(body)
        if fmt is None and content_type not in IMAGE_CONTENT_TYPES:
            return None
        return [self.decode(body)]

    def prefetch(self, rows: Iterable[Any]) -> None:
        """Start decoding every PNG/JPEG among the rows' values (one TorchServe batch: bodies and
        multipart parts) in the pool; `__call__` then collects each result instead of decoding, so
        answers, errors and their order are those of the sequential path. Forgets the previous
        batch's leftovers (parts of a request refused before they were read)."""
        for _, future in self._pending.values():
            future.cancel()
        self._pending = {}
        bodies = [v for row in rows if isinstance(row, dict) for v in row.values()
                  if isinstance(v, (bytes, bytearray)) and sniff_format(v) is not None]
        width = min(self.threads, self.budget() if self.budget else self.threads, len(bodies))
        if width < 2:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="image-decode")
        self._pending = {id(b): (b, Future()) for b in bodies}
        for lane in range(width):  # `width` threads at once, each decoding every width-th image
            self._pool.submit(self._decode_into, [self._pending[id(b)][1] for b in bodies[lane::width]],
                              bodies[lane::width])

    def _decode_into(self, futures: list[Future], bodies: list) -> None:
        for future, body in zip(futures, bodies):
            if future.set_running_or_notify_cancel():  # False: the batch moved on and cancelled it
                try:
                    future.set_result(self.decode(body))
                except RequestError as exc:  # handed to the request that reads it, without this frame
                    future.set_exception(as_answer(exc))
                except BaseException as exc:  # a decoder bug: its traceback is logged by the reader
                    future.set_exception(exc)

    def decode(self, data: bytes | bytearray, where: str = "image") -> np.ndarray:
        """One encoded image -> prepared uint8 (1, C, H, W); a RequestError names what is wrong."""
        try:
            from PIL import Image, ImageOps
        except ImportError as exc:  # the archive's Python lacks Pillow
            raise images_unsupported() from exc
        limit = self.max_pixels if self.max_pixels is not None else Image.MAX_IMAGE_PIXELS
        try:
            # Pillow only warns between its limit and twice that; the size check below refuses
            # (a warnings filter would not do: filters are process-wide and this runs in threads).
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if limit and width * height > limit:
                raise Image.DecompressionBombError(f"{width * height} pixels")
            span = self._draft(image)
            image.load()
            if image.getexif().get(EXIF_ORIENTATION, 1) in SWAPS_AXES:
                width, height, span = height, width, (span[1], span[0])
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
            if image.mode != self.mode:
                image = image.convert(self.mode)
        except Image.DecompressionBombError as exc:
            raise RequestError(
                413, "ImageTooLarge",
                f"{where} is too large to decode ({exc}); at most {limit} pixels are allowed",
            ) from exc
        except Exception as exc:  # Pillow raises many types for corrupt data
            sniffed = sniff_format(data)
            reason = ("Pillow cannot identify it" if isinstance(exc, Image.UnidentifiedImageError)  # its text names a
                      else f"{type(exc).__name__}: {exc}")  # BytesIO's address: no use to the user
            raise bad_request(
                f"{where} ({len(data)} bytes, {sniffed or 'neither PNG nor JPEG'}) cannot be decoded: "
                f"{reason}; send a valid PNG or JPEG",
                "InvalidImage",
            ) from exc
        array = self._resize_and_crop(image, (width, height), span)
        if array.ndim == 2:
            array = array[:, :, None]
        return np.ascontiguousarray(array.transpose(2, 0, 1))[None]

    def _draft(self, image: Any) -> tuple[float, float]:
        """Ask libjpeg for a smaller decode when allowed. Returns the (w, h) the whole stored image
        spans in the pixels that will be decoded (less than its size after a 1/2..1/8 draft)."""
        full = (float(image.size[0]), float(image.size[1]))
        if not (self.jpeg_draft and self.resize is not None and image.format == "JPEG"):
            return full
        drafted = image.draft(None, resized_size(*image.size, self.resize))  # symmetric in w/h: EXIF can wait
        if drafted is None:
            return full
        box = drafted[1]
        return (box[2] - box[0], box[3] - box[1])

    def _resize_and_crop(self, image: Any, size: tuple[int, int], span: tuple[float, float]) -> np.ndarray:
        """Resize the shorter side then center-crop, computing only the kept pixels, as uint8 HWC.

        `size` is the original image's (w, h) and `span` its extent in `image`'s pixels (smaller
        after a draft): target sizes come from `size`, so a drafted decode ends the same shape."""
        from PIL import Image

        if self.resize is None:
            array = np.asarray(image, dtype=np.uint8)
            return center_crop(array, self.crop) if self.crop is not None else array
        new_w, new_h = resized_size(*size, self.resize)
        exact = self.exact_resize and span == size  # not drafted, and asked for
        if exact or self.crop is None or self.crop > new_w or self.crop > new_h:
            resized = image.resize((new_w, new_h), Image.BILINEAR, box=(0, 0, *span))
            array = np.asarray(resized, dtype=np.uint8)
            return center_crop(array, self.crop) if self.crop is not None else array
        sx, sy = span[0] / new_w, span[1] / new_h  # source pixels per resized pixel
        left, top = crop_offsets(new_w, new_h, self.crop)
        box = (left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy)
        return np.asarray(image.resize((self.crop, self.crop), Image.BILINEAR, box=box), dtype=np.uint8)
