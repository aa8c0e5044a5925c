"""Image loading for the edit datasets: decode a path to an RGB picture, and cache repeats.

Records carry image *paths* (see `utils.records`); pixels are only decoded when a model needs
them. `load_image` always returns a fully loaded RGB image that no longer holds its file open.
`ImageCache` keeps the most recently used decoded images, because the datasets reuse pictures
heavily (E-VQA train has 6,345 records but 3,363 unique request images).

Like the reference implementation, EXIF orientation tags are not applied: pixels are used in
the order the file stores them.

`check_images(paths)` reads only the header of each image (format, size; PNG checksums) so that an
empty, corrupt or oversized file is reported before a run starts, not at the chunk or step that
first decodes it. Images larger than `MAX_IMAGE_PIXELS` (default 8192 x 8192; environment
variable LIVEEDIT_MAX_IMAGE_PIXELS) are refused by both the check and `load_image`; Pillow's own
decompression-bomb limit is set to the same number.
"""
from __future__ import annotations

import os
import struct
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from utils.errors import UserError

MAX_PIXELS_ENV = "LIVEEDIT_MAX_IMAGE_PIXELS"


def _max_image_pixels() -> int:
    """The pixel limit: LIVEEDIT_MAX_IMAGE_PIXELS if set (a positive integer), else 8192 * 8192."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return 8192 * 8192
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{MAX_PIXELS_ENV} must be a positive number of pixels, got {value!r}")
    return int(value)


MAX_IMAGE_PIXELS = _max_image_pixels()
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow refuses twice this in Image.open, warns above it;
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse above it with a UserError
_LISTED_PROBLEMS = 5
_PROGRESS_FROM = 2000  # show a progress bar when checking at least this many images
_HEADER_CACHE: dict[tuple, str | None] = {}  # (path, size, mtime) -> problem or None
_HEADER_LOCK = threading.Lock()

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
            too_large = _size_problem(image)
            if too_large:
                raise UserError(f"Cannot read image {path}: {too_large}")
            image.load()
            return _to_rgb(image)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(
            f"Cannot read image {path}: {exc}. The file is corrupt, truncated or not an image; "
            f"download it again."
        ) from exc


def _size_problem(image: Image.Image) -> str | None:
    """Why an opened image is too large to decode, or None."""
    width, height = image.size
    if width < 1 or height < 1:
        return f"it has no pixels ({width} x {height})"
    if width * height > MAX_IMAGE_PIXELS:
        return (f"{width} x {height} = {width * height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                f"(a decompression bomb, or a picture to shrink first; {MAX_PIXELS_ENV} raises the limit)")
    return None


def image_header_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the image file at `path` (missing, empty, not an image, corrupt, too
    large), or None when its header reads fine. Pixels are not decoded; each (path, size, mtime)
    is checked once per process."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not os.path.isfile(path):
        return "is not a file"
    key = (os.path.normpath(path), stat.st_size, stat.st_mtime_ns)
    with _HEADER_LOCK:
        if key in _HEADER_CACHE:
            return _HEADER_CACHE[key]
    problem = "is empty (0 bytes)" if stat.st_size == 0 else _read_header(path)
    with _HEADER_LOCK:
        _HEADER_CACHE[key] = problem
    return problem


def _read_header(path: str) -> str | None:
    """Open the image (header only), check its size, and let Pillow verify what it can cheaply."""
    try:
        with Image.open(path) as image:
            problem = _size_problem(image)
            if problem:
                return problem
            image.verify()  # PNG: chunk checksums; other formats: structure only, no pixel decode
    except Image.DecompressionBombError as exc:
        return f"is over the pixel limit of {MAX_IMAGE_PIXELS} ({exc}; {MAX_PIXELS_ENV} raises the limit)"
    except UnidentifiedImageError:
        return "is not an image Pillow can read (corrupt, truncated or another kind of file)"
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        return f"is corrupt or truncated ({exc})"
    return None


def check_images(paths: Iterable[str], source: str = "the data set") -> int:
    """Read the header of every distinct image in `paths`; one `UserError` listing the bad ones.

    Returns how many distinct images were checked. `source` (e.g. the annotation file) is named in
    the message. A progress bar is shown for large sets.
    """
    unique = list(dict.fromkeys(os.fspath(p) for p in paths))
    bad = []
    for path in tqdm(unique, desc="checking images", unit="image", leave=False,
                     disable=len(unique) < _PROGRESS_FROM):
        problem = image_header_problem(path)
        if problem:
            bad.append(f"{path}: {problem}")
    if bad:
        listed = "\n  ".join(bad[:_LISTED_PROBLEMS])
        more = f"\n  ... and {len(bad) - _LISTED_PROBLEMS} more" if len(bad) > _LISTED_PROBLEMS else ""
        raise UserError(f"{len(bad)} of {len(unique)} images referenced by {source} cannot be used:\n  "
                        f"{listed}{more}\nReplace these files (download them again), or remove the records "
                        f"that use them.")
    return len(unique)


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
