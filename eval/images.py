"""Opening user images safely: anything PIL can decode, in any mode, never a decompression bomb."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

MAX_PIXELS = 40_000_000      # ~6k x 6k; larger images are refused before decoding
# Each side is bounded too: pad_to_square makes max(w, h)^2 pixels, so a 692-byte 20000x10 PNG (0.2 MP)
# would become a 400 MP square. With every side <= MAX_SIDE the square stays under MAX_PIXELS.
MAX_SIDE = 6_000
MAX_BYTES = 50 * 1024 * 1024


class ImageError(ValueError):
    """The input is not an image we can use; the message says why, for the user."""


def check_size(w: int, h: int, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> None:
    """Refuse sizes that would take too much memory to decode or to pad square (read from the header)."""
    if w < 1 or h < 1:
        raise ImageError("image has no pixels")
    if max(w, h) > max_side:
        raise ImageError(f"image is {w}x{h}; each side may be at most {max_side} px "
                         "(this guards against decompression bombs)")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h / 1e6:.0f} MP; the limit is {max_pixels / 1e6:.0f} MP "
                         "(this guards against decompression bombs)")


def load_image(source, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE):
    """Return an RGB PIL image from a path, bytes or PIL image. Transparent images are laid on
    white (charts are drawn on white), CMYK / 16-bit / grayscale / palette images are converted.
    Sizes are checked from the header, before any pixel is decoded."""
    from PIL import Image

    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"image not found: {path.name}")   # the folder may be a server temp dir
            if path.stat().st_size > MAX_BYTES:
                raise ImageError(f"image file is {path.stat().st_size // 2**20} MB; the limit is {MAX_BYTES // 2**20} MB")
            data = path.read_bytes()
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            raise ImageError(f"expected an image path, bytes or PIL image, got {type(source).__name__}")
        try:
            with warnings.catch_warnings():     # our own limit below says it more plainly
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ImageError("image is too large to decode safely (possible decompression bomb)") from None
        except Exception:
            raise ImageError("not an image PIL can read (corrupt, or another file type)") from None
    check_size(*img.size, max_pixels=max_pixels, max_side=max_side)
    try:
        img.load()
    except Exception as e:
        raise ImageError(f"image data is truncated or corrupt ({e})") from None
    return to_rgb(img)


def to_rgb(img):
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grayscale: scale to 8 bits
        import numpy as np
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / top)).astype("uint8")).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def pad_to_square(img, fill=None):
    """LLaVA's `image_aspect_ratio pad`: centre the image on a square of its mean colour, so the
    processor's resize+crop keeps the whole chart instead of cutting its sides."""
    from PIL import Image, ImageStat

    w, h = img.size
    if w == h:
        return img
    check_size(max(w, h), max(w, h))     # a caller's own PIL image may not have been through load_image
    if fill is None:
        fill = tuple(int(c) for c in ImageStat.Stat(img).mean[:3])
    side = max(w, h)
    square = Image.new("RGB", (side, side), fill)
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    return square


def downsize(img, max_side: int):
    """Shrink (never enlarge) so the longer side is at most `max_side`."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))))
