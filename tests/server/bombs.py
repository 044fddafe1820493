"""Decompression bombs for the decoder tests: small files that decode to huge images.

(Not in conftest.py: several test folders have a conftest, so ``from conftest import``
is ambiguous.)
"""

from __future__ import annotations

import struct
import zlib

CHUNK = 1 << 20


def zeros_zlib(size: int) -> bytes:
    """A zlib stream of ``size`` zero bytes, built in milliseconds: one 1 MiB chunk is
    compressed once and repeated (a full flush makes each chunk's block independent)."""
    compressor = zlib.compressobj(9)
    head = compressor.compress(bytes(CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = compressor.compress(bytes(CHUNK)) + compressor.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(size, CHUNK)
    tail = compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FULL_FLUSH) if rest else b""
    final = b"\x03\x00"  # a last, empty block (fixed Huffman, end of block)
    adler = (size % 65521) << 16 | 1  # Adler-32 of zeros: a = 1, b = size mod 65521
    if count == 0:
        return head[:2] + tail + final + struct.pack(">I", adler)
    return head + body * (count - 1) + tail + final + struct.pack(">I", adler)


def tiff_bomb(width: int, height: int) -> bytes:
    """A little-endian 8-bit gray TIFF of ``width`` x ``height`` zeros, one Deflate strip
    (30000 x 30000: 0.9 GB decoded from a file under 1 MB)."""
    data = zeros_zlib(width * height)
    entries = [  # tag, type (3 SHORT, 4 LONG), value
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),  # BitsPerSample
        (259, 3, 8),  # Compression: Deflate
        (262, 3, 1),  # PhotometricInterpretation: BlackIsZero
        (273, 4, 0),  # StripOffsets (patched below)
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, len(data)),  # StripByteCounts
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + data


def pgm_header(width: int, height: int) -> bytes:
    """A binary PGM declaring ``width`` x ``height`` with no pixels: a format the server
    has no header check for (OpenCV's own bound refuses it, or it fails to decode)."""
    return f"P5\n{width} {height}\n255\n".encode() + bytes(16)
