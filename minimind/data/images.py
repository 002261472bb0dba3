"""Reading an image: the one decode path of training, evaluation and serving, with Pillow only (no torch),
so that the serving gateway checks a client's image with exactly the code its model replica decodes it
with. The size is read from the header and bounded before any pixel is decoded."""

from __future__ import annotations

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused (Pillow's decompression-bomb guard is far larger)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


class ImageTooLarge(ImageError):
    """More pixels than allowed (a decompression bomb, or just too big)."""


class ImageOutOfShape(ImageError):
    """A long side too many times its short side: a processor that scales the short side up to its input
    size would make the long side, and its memory and time, that many times larger."""


class UnknownImageFormat(ImageError):
    """Not one of the formats asked for (or not an image at all)."""


def load_image(source, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None, formats: tuple[str, ...] | None = None,
               max_aspect_ratio: float | None = None) -> Image.Image:
    """An RGB image from a path or a binary file object: EXIF orientation applied, any mode converted,
    anything over `max_pixels` or `max_aspect_ratio` refused before it is decoded. `formats` (Pillow's
    names, e.g. ("PNG", "JPEG")) limits which parsers may look at the bytes."""
    name = name or str(source)
    too_large = f"{name}: image too large (more than {max_pixels:,} pixels)"
    try:
        with Image.open(source, formats=formats) as image:  # reads the header only: the size is known, nothing decoded yet
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{too_large}: {width}x{height}")
            if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
                raise ImageOutOfShape(f"{name}: a {width}x{height} image; its long side may be at most "
                                      f"{max_aspect_ratio:g} times its short side")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: one decoded copy fewer
            return image.convert("RGB")  # a new image (a copy when already RGB): this one closes with its file
    except Image.DecompressionBombError as error:  # Pillow's own, far larger limit
        raise ImageTooLarge(f"{too_large}: {error}") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such image file") from None
    except (ImageError, MemoryError):  # out of memory is this process's trouble, not a corrupt image
        raise
    except UnidentifiedImageError:
        expected = ", ".join(formats) if formats else "a format Pillow reads"
        raise UnknownImageFormat(f"{name}: not a readable image (not {expected})") from None
    except Exception as error:  # noqa: BLE001 - Pillow's parsers raise many kinds (struct.error from a garbage EXIF block)
        raise ImageError(f"{name}: not a readable image ({type(error).__name__}: {error})") from None
