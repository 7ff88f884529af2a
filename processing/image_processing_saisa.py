"""SAISA's image processor: CLIP preprocessing preceded by LLaVA-1.5's pad-to-square, on the PIL backend.

Why a class of our own instead of `CLIPImageProcessorPil`:
- SAISA (like LLaVA-1.5 with `image_aspect_ratio="pad"`) pastes the image centred on a square canvas filled with
  the mean colour before the CLIP resize + centre crop, so nothing is cropped away. The fill is
  `tuple(int(255 * m) for m in image_mean)` = (122, 116, 104) for CLIP's mean: the original code truncates with
  `int()`, and so do we (rounding would give (123, 117, 104) and change border pixels).
- Image mode conversion follows the original `Image.open(path).convert("RGB")` (alpha is dropped, not composited on
  white), so a PIL image and the same image given as a file path give identical pixels. 16-bit and float
  grayscale images are scaled to 8 bits first, because PIL would otherwise clip them.
- Empty or zero-size images are rejected with a message naming the image, instead of failing deep in numpy.
- Image paths that do not exist or cannot be decoded raise `ValueError` naming the path.

Only PIL and NumPy are needed (torchvision does not import beside the CPU torch used here).
"""

# No `from __future__ import annotations`: transformers reads the kwargs TypedDicts' annotations at runtime.

import base64
import binascii
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers import CLIPImageProcessorPil
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput, PILImageResampling, SizeDict, load_image
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

__all__ = ["SaisaImageProcessor", "SaisaImagesKwargs", "install_pipeline_image_errors", "pad_fill_color"]


class SaisaImagesKwargs(ImagesKwargs, total=False):
    """Image kwargs understood by `SaisaImageProcessor` on top of transformers' `ImagesKwargs`.

    do_pad_to_square (`bool`, *optional*, defaults to `True`):
        Paste the image centred on a square canvas of side max(height, width), filled with `pad_fill_color(image_mean)`,
        before resizing (LLaVA-1.5 "pad" aspect ratio). Off gives plain CLIP preprocessing (the centre crop then
        cuts the long side).
    """

    do_pad_to_square: bool


def pad_fill_color(image_mean: float | tuple[float, ...] | list[float]) -> tuple[int, ...]:
    """The canvas colour of pad-to-square: `int(255 * mean)` per channel, as in LLaVA's `expand2square` call."""
    if isinstance(image_mean, (int, float)):
        image_mean = (image_mean,) * 3
    return tuple(int(255 * m) for m in image_mean)


def _pil_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB the way LLaVA loads files (`convert("RGB")`), keeping high-bit-depth data.

    Modes `I`, `I;16*` and `F` hold values beyond 255 that `convert("RGB")` would clip to white; they are scaled to
    0..255 first (by 1/257 for 16-bit ranges, or by the image's own maximum beyond that).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        if peak > 255.0:
            array = array / 257.0 if peak <= 65535.0 else array * (255.0 / peak)
        elif image.mode == "F" and peak <= 1.0:
            array = array * 255.0  # float images in [0, 1]
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(array).convert("RGB")  # 2-D uint8 -> mode "L"
    return image.convert("RGB")


class SaisaImageProcessor(CLIPImageProcessorPil):
    r"""
    CLIP image processor (PIL backend) with LLaVA-1.5's pad-to-square step, as SAISA was trained.

    Defaults are those of `openai/clip-vit-large-patch14-336`: resize the shortest side to 336 (bicubic), centre-crop
    336, rescale by 1/255, normalise with CLIP's mean/std; plus `do_pad_to_square=True` before all of that.
    Output: `pixel_values` of shape (n_images, 3, 336, 336), float32.

    Accepts PIL images of any mode (RGB, L, LA, P, RGBA, CMYK, I;16, ...), NumPy arrays / torch tensors (HWC or CHW,
    1, 3 or 4 channels, or 2-D grayscale), and strings (a local path, an http(s) URL or base64 data).

    Args:
        do_pad_to_square (`bool`, *optional*, defaults to `True`):
            Whether to pad images to a square filled with `pad_fill_color(image_mean)` before resizing.
        **kwargs: any `CLIPImageProcessorPil` argument (`size`, `crop_size`, `image_mean`, `image_std`, ...).
    """

    valid_kwargs = SaisaImagesKwargs
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    do_pad_to_square = True

    def __init__(self, **kwargs: Unpack[SaisaImagesKwargs]) -> None:
        super().__init__(**kwargs)

    # ----------------------------------------------------------------------------------------------- loading
    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Load strings (paths, URLs, base64) into PIL images, nested like the input.

        Overridden to fail with the offending path: transformers' loader reports a missing file as a failed base64
        decode. Non-strings pass through unchanged (they are checked in `process_image`).
        """
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return self._load_image_string(image_url_or_urls)
        if isinstance(image_url_or_urls, os.PathLike):
            return self._load_image_string(os.fspath(image_url_or_urls))
        if getattr(image_url_or_urls, "ndim", None) == 2:
            # A 2-D array is one grayscale image (transformers would read it as a batch of rows): make it explicit.
            array = np.asarray(image_url_or_urls.cpu() if hasattr(image_url_or_urls, "cpu") else image_url_or_urls)
            return PIL.Image.fromarray(array) if array.dtype == np.uint8 and array.size else array[..., None]
        return image_url_or_urls

    @staticmethod
    def _load_image_string(source: str) -> PIL.Image.Image:
        """Open a path (or URL / base64 string) as a fully decoded PIL image, or raise `ValueError` naming it."""
        if source.startswith(("http://", "https://", "data:image/")):
            return load_image(source)
        if os.path.isdir(source):
            raise ValueError(f"Image path {source!r} is a directory, not an image file.")
        if not os.path.isfile(source):
            try:
                data = base64.b64decode(source, validate=True) if source else b""
            except (binascii.Error, ValueError):
                data = b""
            if not data:
                raise ValueError(f"Image file {source!r} does not exist.")
            try:
                return load_image(source)
            except (OSError, ValueError) as err:
                raise ValueError(f"{source[:64]!r} is neither an existing image file nor base64 image data.") from err
        try:
            with PIL.Image.open(source) as opened:
                image = PIL.ImageOps.exif_transpose(opened)
                image.load()
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read image file {source!r}: {err}") from err
        return image

    # -------------------------------------------------------------------------------------------- per image
    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Validate one image and turn it into a uint8/float CHW array with 3 channels."""
        if isinstance(image, PIL.Image.Image):
            width, height = image.size
            if width == 0 or height == 0:
                raise ValueError(f"Got an empty image of size {width}x{height} (width x height); images need pixels.")
            if do_convert_rgb:
                image = _pil_to_rgb(image)
        else:
            shape = tuple(getattr(image, "shape", ()))
            if len(shape) not in (2, 3):
                raise ValueError(
                    f"Expected an image as a PIL image, or an array/tensor of shape (H, W), (H, W, C) or (C, H, W); "
                    f"got {type(image).__name__} with shape {shape}."
                )
            if 0 in shape:
                raise ValueError(f"Got an empty image array of shape {shape}; images need pixels.")
        return super().process_image(image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format)

    def pad_to_square(self, image: np.ndarray, fill: tuple[float, ...] | float = 0) -> np.ndarray:
        """Centre `image` (C, H, W) on a square canvas of side max(H, W) filled with `fill` (one value per channel).

        The offset is `(side - short) // 2`, as in LLaVA's `expand2square`, so odd margins put the extra row/column
        after the image.
        """
        channels, height, width = image.shape
        if height == width:
            return image
        side = max(height, width)
        fill_values = (fill,) * channels if isinstance(fill, (int, float)) else tuple(fill)
        if len(fill_values) != channels:
            raise ValueError(f"The pad colour has {len(fill_values)} values but the image has {channels} channels.")
        canvas = np.empty((channels, side, side), dtype=image.dtype)
        canvas[...] = np.asarray(fill_values, dtype=image.dtype).reshape(channels, 1, 1)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[:, top : top + height, left : left + width] = image
        return canvas

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors: str | TensorType | None,
        do_pad_to_square: bool | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Pad to square (if asked), then CLIP's resize, centre crop, rescale and normalise, image by image."""
        if not images:
            raise ValueError("Got an empty list of images; pass at least one image.")
        if do_pad_to_square:
            fill = pad_fill_color(image_mean if image_mean is not None else self.image_mean)
            padded = []
            for image in images:
                in_unit_range = np.issubdtype(image.dtype, np.floating) and float(image.max()) <= 1.0
                # Float input already scaled to [0, 1] gets the fill in the same range.
                padded.append(self.pad_to_square(image, tuple(f / 255.0 for f in fill) if in_unit_range else fill))
            images = padded
        return super()._preprocess(
            images,
            do_resize=do_resize,
            size=size,
            resample=resample,
            do_center_crop=do_center_crop,
            crop_size=crop_size,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            do_pad=do_pad,
            pad_size=pad_size,
            return_tensors=return_tensors,
            **kwargs,
        )


def _image_strings(images: Any) -> list[str]:
    if isinstance(images, str):
        return [images]
    if isinstance(images, (list, tuple)):
        return [s for item in images for s in _image_strings(item)]
    return []


def install_pipeline_image_errors() -> None:
    """Make `pipeline("image-text-to-text")` report a missing image file as "Image file 'x' does not exist.".

    Why: that pipeline loads image strings itself (`load_images`), before the processor sees them, and transformers
    reports a missing local file as a failed base64 decode ("Incorrect image source ... Incorrect padding"). Only the
    error path changes: the pipeline's own loader still loads every image; when it fails, the strings are checked
    with this package's loader, whose message names the file, and the original error is kept as the cause.
    Idempotent (importing the package twice wraps once).
    """
    from transformers.pipelines import image_text_to_text

    original = image_text_to_text.load_images
    if getattr(original, "_saisa_wrapped", False):
        return

    def load_images(images: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(images, *args, **kwargs)
        except (ValueError, OSError) as err:
            for source in _image_strings(images):
                if not source.startswith(("http://", "https://", "data:image/")):
                    try:
                        SaisaImageProcessor._load_image_string(source)
                    except ValueError as clear:
                        raise ValueError(str(clear)) from err
            raise

    load_images._saisa_wrapped = True  # type: ignore[attr-defined]
    image_text_to_text.load_images = load_images
