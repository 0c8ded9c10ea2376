"""Image files as a FashionMNIST model's input: the image files among paths and in folders, each read without
trusting it (a regular file, in one of the formats below, within PIL's decompression-bomb limit) and converted
to 28x28 grayscale pixels in [0, 1]. Torch-free, as `fmnist_lab.predict` is for ONNX models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fmnist_lab.untrusted import BadFileError, open_regular

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# The decoders PIL may use: those of the suffixes above. PIL picks a decoder by content, and some (EPS, PDF)
# hand the file to other programs, such as Ghostscript.
IMAGE_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]


def image_files(paths: Sequence[str]) -> list[Path]:
    """Files as given (a bad one still reaches the reader, which reports it) and image files in folders."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    return files


def read_image(path: Path, warn: Callable[[str], None]) -> np.ndarray:
    """float32 [1, 28, 28] in [0, 1], as ToTensor gives for a FashionMNIST image."""
    from PIL import Image, UnidentifiedImageError

    try:
        f = open_regular(path)  # a FIFO or a device is refused without waiting on it
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except BadFileError as err:
        raise ValueError(str(err).removeprefix(f"{path} ")) from None
    except OSError as err:
        raise ValueError(f"cannot be opened ({err.strerror})") from None
    with f:
        try:
            with Image.open(f, formats=IMAGE_FORMATS) as image:
                image.load()
        except Image.DecompressionBombError:
            raise ValueError(f"not read: its decoded size is absurd (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, "
                             "PIL's decompression-bomb limit)") from None
        except UnidentifiedImageError:
            raise ValueError(f"not a readable image (not {', '.join(IMAGE_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError) as err:  # PIL's decoders raise all these
            raise ValueError(f"not a readable image ({err.__class__.__name__})") from None
    changes = []
    if image.mode != "L":
        changes.append(f"{image.mode} to grayscale")
        image = image.convert("L")
    if image.size != (28, 28):
        changes.append(f"{image.size[0]}x{image.size[1]} to 28x28")
        image = image.resize((28, 28), Image.Resampling.BILINEAR)
    if changes:
        warn(f"{path}: converted {' and '.join(changes)}")
    pixels = np.asarray(image, dtype=np.float32)[None] / 255.0
    border = np.concatenate([pixels[0, [0, -1]].ravel(), pixels[0, :, [0, -1]].ravel()])
    if border.mean() > 0.5:
        warn(f"{path}: light background; FashionMNIST garments are light on black (invert the image?)")
    return pixels
