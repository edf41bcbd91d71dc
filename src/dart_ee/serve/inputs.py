"""Request bodies to pixels: what ``POST /predict`` accepts, each refused with a 4xx and a message that says
what to send instead.

- ``image/png``, ``image/jpeg`` (any ``image/*`` Pillow reads): one image file, converted and resized to the
  model's input as the training data was (``dart_ee.data.decode``);
- ``application/x-npy``: a ``.npy`` file (``np.save``) of uint8 pixels, (C, H, W) or (N, C, H, W); no pickles;
- ``application/json``: ``{"pixels": [...]}``, nested lists of integers 0..255 of the same shapes.
"""

from __future__ import annotations

import io
import json

import numpy as np

from dart_ee.core.errors import DartError, DataError
from dart_ee.data.decode import decode_image

FORMATS = "image/png or image/jpeg (one image file), application/x-npy (uint8 (C, H, W) or (N, C, H, W)), " \
          "or application/json ({\"pixels\": nested lists of 0..255})"


class BadRequest(DartError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_body(body: bytes, content_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """A request body -> uint8 (N, C, H, W) of the model's input shape ``(C, H, W)``."""
    kind = content_type.split(";")[0].strip().lower()
    if not body:
        raise BadRequest(400, f"empty request body: send {FORMATS}")
    if kind.startswith("image/"):
        try:
            return decode_image(body, "request body", size=shape[1], channels=shape[0])[None]
        except DataError as e:
            raise BadRequest(400, str(e)) from None
    if kind == "application/x-npy":
        try:
            x = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadRequest(400, f"not a .npy file ({e}); write one with numpy.save (uint8, no pickles)") from None
    elif kind == "application/json":
        x = _json_pixels(body)
    else:
        raise BadRequest(415, f"content type {kind or '(none)'!r} is not accepted: send {FORMATS}")
    return _checked(x, shape)


def _json_pixels(body: bytes) -> np.ndarray:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON ({e}); send {{\"pixels\": [...]}}") from None
    if not isinstance(doc, dict) or "pixels" not in doc:
        raise BadRequest(400, "the JSON body needs a \"pixels\" field: nested lists of integers 0..255, (C, H, W) or "
                              "(N, C, H, W)")
    try:
        x = np.asarray(doc["pixels"])
    except ValueError as e:  # ragged lists
        raise BadRequest(422, f"\"pixels\" is not a regular array ({e})") from None
    if x.dtype.kind not in "iu" or x.size == 0:
        raise BadRequest(422, f"\"pixels\" must hold integers 0..255, got {x.dtype.name if x.size else 'nothing'}")
    if x.min() < 0 or x.max() > 255:
        raise BadRequest(422, f"\"pixels\" must lie in 0..255, got {x.min()}..{x.max()}")
    return x.astype(np.uint8)


def _checked(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.dtype != np.uint8:
        raise BadRequest(422, f"pixels must be uint8, got {x.dtype}; convert with x.astype(numpy.uint8)")
    if x.ndim == len(shape):
        x = x[None]
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape) or len(x) == 0:
        want = ", ".join(map(str, shape))
        raise BadRequest(422, f"expected pixels of shape ({want}) or (N, {want}) with N >= 1, got {tuple(x.shape)}")
    return np.ascontiguousarray(x)
