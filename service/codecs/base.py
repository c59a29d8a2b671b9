"""The codec interface: bytes ⇄ RGB pixels, chosen by declared media type and checked by magic bytes.

A codec decodes an upload into :class:`DecodedImage` (pixels [H, W, 3] uint8 RGB whatever the
stored mode was) and encodes a result [H, W, C] uint8 (C = 3 colour or 1 gray) back to bytes. Formats
whose answer depends on the request (DICOM: a derived instance of the same study) keep what they need
in ``DecodedImage.source`` and get it back in :meth:`Codec.encode`.

Decoding must refuse an image larger than ``max_pixels`` from its header, before pixel data is
expanded (:class:`ImageTooLarge`), and raise :class:`UndecodableImage` for broken data.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class CodecError(ValueError):
    """Base of decode/encode errors raised for client data."""


class UndecodableImage(CodecError):
    """The bytes are not a readable image of the claimed format (→ 415)."""


class ImageTooLarge(CodecError):
    """The header announces more pixels than allowed (→ 413); raised before decoding the pixels."""


#: Pillow modes of single-channel (gray) images.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass
class DecodedImage:
    """An upload after decoding.

    Attributes:
        pixels: uint8 [H, W, 3] RGB, orientation applied (EXIF), alpha composited on black.
        media_type: the codec's media type, e.g. ``image/png``.
        mode: the stored pixel mode, e.g. ``RGB``, ``L``, ``I;16``, ``RGBA``, ``CMYK``.
        bit_depth: bits per sample as stored (8 or 16 usually).
        source: format-specific object needed to encode the answer (e.g. a DICOM dataset), else None.
        samples16: the stored 16-bit samples, uint16 [H, W] (gray) or [H, W, 3] (RGB), when the
            upload had more than 8 bits per sample; answers are given back at that depth.
    """

    pixels: np.ndarray
    media_type: str
    mode: str
    bit_depth: int
    source: Any = None
    samples16: np.ndarray | None = None

    @property
    def gray(self) -> bool:
        """Stored with one colour channel (gray or gray + alpha): answers are gray too."""
        return self.mode in GRAY_MODES or (self.samples16 is not None and self.samples16.ndim == 2)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class EncodeContext:
    """What an encoder may record about how the result was made (no patient data).

    Attributes:
        task: ``enhance``, ``segment`` or ``degrade``.
        model_version: served weights version (``preset-sha12``).
        description: one-line human description of the processing.
        extra: free-form provenance (e.g. degradation parameters).
    """

    task: str
    model_version: str
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Codec(abc.ABC):
    """One image format.

    Attributes:
        media_type: canonical media type (``image/png``).
        format_name: short name used by the ``format=`` query (``png``).
        aliases: other media types clients use for the same format (``image/jpg``).
        can_decode / can_encode: which directions the codec supports.
    """

    media_type: str
    format_name: str
    aliases: tuple[str, ...] = ()
    can_decode: bool = True
    can_encode: bool = True

    @abc.abstractmethod
    def sniff(self, head: bytes) -> bool:
        """True when ``head`` (the first bytes of a file, ≥ 132 when available) has this format's magic."""

    @abc.abstractmethod
    def decode(self, data: bytes, *, max_pixels: int) -> DecodedImage:
        """Decode ``data``; raises :class:`ImageTooLarge` or :class:`UndecodableImage`."""

    @abc.abstractmethod
    def encode(self, pixels: np.ndarray, *, original: DecodedImage | None, context: EncodeContext) -> bytes:
        """Encode uint8 [H, W, 3] or [H, W] ``pixels``; ``original`` is the decoded upload, if any."""


class CodecRegistry:
    """Codecs by media type, alias and format name, plus magic-byte sniffing in registration order."""

    def __init__(self) -> None:
        self._codecs: list[Codec] = []

    def register(self, codec: Codec) -> None:
        self._codecs = [c for c in self._codecs if c.media_type != codec.media_type]
        self._codecs.append(codec)

    @property
    def codecs(self) -> tuple[Codec, ...]:
        return tuple(self._codecs)

    def by_media_type(self, media_type: str) -> Codec | None:
        wanted = media_type.split(";", 1)[0].strip().lower()
        for codec in self._codecs:
            if wanted == codec.media_type or wanted in codec.aliases:
                return codec
        return None

    def by_format(self, name: str) -> Codec | None:
        wanted = name.strip().lower()
        for codec in self._codecs:
            if codec.format_name == wanted:
                return codec
        return None

    def sniff(self, head: bytes) -> Codec | None:
        for codec in self._codecs:
            if codec.can_decode and codec.sniff(head):
                return codec
        return None

    def decodable_types(self) -> list[str]:
        return [c.media_type for c in self._codecs if c.can_decode]

    def encodable_formats(self) -> list[str]:
        return [c.format_name for c in self._codecs if c.can_encode]
