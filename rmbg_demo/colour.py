"""Colour profiles, kept: a Display P3 or Adobe RGB photo's cut-out carries the photo's ICC profile (or,
when asked, is converted to sRGB through littlecms), and a CMYK JPEG is converted through its own
embedded profile rather than Pillow's profile-less formula."""
from __future__ import annotations

import io
import logging

from PIL import Image, ImageCms


def profile_of(image: Image.Image) -> bytes | None:
    """The image's ICC profile when it describes RGB colours (a grey or CMYK one does not fit an RGB output)."""
    icc = image.info.get("icc_profile") or None
    return icc if icc and icc[16:20] == b"RGB " else None


def _profile(data: bytes):
    return ImageCms.ImageCmsProfile(io.BytesIO(data))


def to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """`image` (RGB or RGBA, in the colours of the profile `icc`) in sRGB; as it is without a profile."""
    if not icc:
        return image
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    converted = ImageCms.profileToProfile(rgb, _profile(icc), ImageCms.createProfile("sRGB"), outputMode="RGB")
    if image.mode == "RGBA":
        converted.putalpha(image.getchannel("A"))
    return converted


def cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """A CMYK image in sRGB, through its embedded profile when it has one."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            converted = ImageCms.profileToProfile(image, _profile(icc), ImageCms.createProfile("sRGB"),
                                                  outputMode="RGB")
            converted.info = {k: v for k, v in image.info.items() if k != "icc_profile"}
            return converted
        except (ImageCms.PyCMSError, OSError) as exc:  # a profile littlecms cannot use (or not a CMYK one)
            logging.getLogger(__name__).warning("a CMYK image's embedded colour profile cannot be used (%s); "
                                                "converted without it, colours may be off", exc)
    converted = image.convert("RGB")
    converted.info.pop("icc_profile", None)
    return converted
