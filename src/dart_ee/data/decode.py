"""Image files to pixels: the one decoder that both data paths (in memory and streamed) use, so a streamed
run sees exactly the pixels an in-memory one does. Every mode Pillow reads (16-bit, palette, CMYK, grey,
alpha) becomes the dataset's channels in the 8-bit range; a header over ``MAX_PIXELS`` is refused before
anything is decoded."""

from __future__ import annotations

import io

import numpy as np

from dart_ee.core.errors import DataError

MAX_PIXELS = 4096 * 4096  # per image file: a corrupt or hostile header must not allocate gigabytes


def decode_image(data: bytes, where: str, size: int | None = None, channels: int | None = None) -> np.ndarray:
    """One image file's bytes -> uint8 (C, H, W); resized to ``size`` x ``size`` and converted to
    ``channels`` (1: grey, 3: RGB) when given, else grey files stay grey and the rest become RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:  # checked on the header, before anything is decoded
                raise DataError(f"{where}: {im.width}x{im.height} pixels is too large to decode here (at most "
                                f"{MAX_PIXELS:,} pixels); shrink the images first")
            im.load()
            src: Image.Image = im
            if im.mode.startswith("I"):  # 16-bit grey (I;16*, or I): keep the high byte, as Pillow does for 16-bit RGB
                src = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8), "L")
            grey = channels == 1 if channels else src.mode in ("1", "L", "LA")
            out = src.convert("L" if grey else "RGB")  # palette, CMYK, alpha: Pillow's conversions (alpha dropped)
            if size and out.size != (size, size):
                out = out.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(out)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: unreadable image ({e}); remove or replace the file") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, size, size) with the resampling ``decode_image`` uses."""
    from PIL import Image

    if x.shape[2:] == (size, size):
        return x
    out = np.empty((len(x), x.shape[1], size, size), np.uint8)
    for i, a in enumerate(x):
        im = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
        r = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
        out[i] = r[None] if r.ndim == 2 else r.transpose(2, 0, 1)
    return out
