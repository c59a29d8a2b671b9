"""Image codecs: the interface, the built-in raster formats and the default registry.

Optional formats plug in by module: each module named in ``OPTIONAL_CODEC_MODULES`` that imports
cleanly must expose ``make_codec() -> Codec``; its codec is registered after PNG/JPEG/TIFF.
"""

from __future__ import annotations

import importlib
import logging

from service.codecs.base import (
    Codec,
    CodecError,
    CodecRegistry,
    DecodedImage,
    EncodeContext,
    ImageTooLarge,
    UndecodableImage,
)
from service.codecs.raster import JpegCodec, PngCodec, TiffCodec

__all__ = [
    "Codec",
    "CodecError",
    "CodecRegistry",
    "DecodedImage",
    "EncodeContext",
    "ImageTooLarge",
    "UndecodableImage",
    "default_registry",
]

OPTIONAL_CODEC_MODULES = ("service.dicom.codec",)

log = logging.getLogger("fundus.codecs")


def default_registry() -> CodecRegistry:
    """PNG, JPEG, TIFF, plus any optional codec module that is installed."""
    registry = CodecRegistry()
    for codec in (PngCodec(), JpegCodec(), TiffCodec()):
        registry.register(codec)
    for name in OPTIONAL_CODEC_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        registry.register(module.make_codec())
        log.debug("registered optional codec", extra={"codec_module": name})
    return registry
