"""Image loading for the edit datasets: decode a path to an RGB picture, and cache repeats.

Records carry image *paths* (see `utils.records`); pixels are only decoded when a model needs
them. `load_image` always returns a fully loaded RGB image that no longer holds its file open.
`ImageCache` keeps the most recently used decoded images, because the datasets reuse pictures
heavily (E-VQA train has 6,345 records but 3,363 unique request images).

Like the reference implementation, EXIF orientation tags are not applied: pixels are used in
the order the file stores them.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode the image at `path` and return it as an RGB `PIL.Image.Image`.

    Transparent images are composited on white, 16-bit and float images are scaled to 8 bits,
    and every other mode (L, 1, P, CMYK, YCbCr, ...) is converted with Pillow.
    Raises `UserError` naming the path when the file is missing, unreadable or corrupt.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(
            f"Image not found: {path}. Check that the dataset images were downloaded and that "
            f"the image root folder is right."
        )
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(
            f"Cannot read image {path}: {exc}. The file is corrupt, truncated or not an image; "
            f"download it again."
        ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return a new RGB image with the content of `image` (never `image` itself)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer ("I;16*", "I") or float ("F") grey image to 8-bit RGB.

    Integer images are taken to use the 16-bit range (0..65535, as 16-bit PNGs do); float
    images in 0..1 are stretched to 0..255, other float images are clipped to 0..255.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
    else:
        values = values / 257.0
    grey = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with an alpha channel or a transparent colour onto a white background."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


class ImageCache:
    """A thread-safe least-recently-used cache of decoded RGB images, keyed by path.

    `get(path)` decodes each path at most once while it stays cached, even when several threads
    ask for it at the same time; the others wait for the first decode. Returned images are
    shared between callers: treat them as read-only (copy before drawing on one).
    """

    def __init__(self, max_items: int = 256) -> None:
        if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
            raise ValueError(f"ImageCache max_items must be a positive integer, got {max_items!r}")
        self.max_items = max_items
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike) -> Image.Image:
        """Return the RGB image at `path`, decoding it only if it is not cached."""
        key = os.path.normpath(os.fspath(path))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = Future()
                self.misses += 1
                owner = True
            else:
                self.hits += 1
                owner = False
        if not owner:
            return pending.result()
        return self._decode_and_store(key, pending)

    def _decode_and_store(self, key: str, pending: Future) -> Image.Image:
        """Decode `key`, publish the result to waiting threads, and insert it into the cache."""
        try:
            image = load_image(key)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._items[key] = image
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        pending.set_result(image)
        return image

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, (str, os.PathLike)):
            return False
        with self._lock:
            return os.path.normpath(os.fspath(path)) in self._items

    def clear(self) -> None:
        """Drop every cached image (in-flight decodes still complete for their callers)."""
        with self._lock:
            self._items.clear()
