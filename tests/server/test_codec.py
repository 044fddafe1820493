"""Decoding images and masks (PNG, JPEG, raw, palette), encoding masks, size limits."""

from __future__ import annotations

import resource
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from bombs import pgm_header, tiff_bomb

from visionserve.server import codec
from visionserve.server.errors import InvalidArgument, ResourceExhausted

LIMIT = 1_000_000


def png(array: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", array)
    assert ok
    return buffer.tobytes()


def palette_png(indices: np.ndarray, palette: list[tuple[int, int, int]]) -> bytes:
    """A hand-built 8-bit palette PNG (colour type 3), VOC style."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    height, width = indices.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in indices.astype(np.uint8))
    return (
        codec.PNG_SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", bytes(v for colour in palette for v in colour))
        + chunk(b"tRNS", bytes([255] * len(palette)))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


def test_png_comes_back_rgb(rgb: np.ndarray) -> None:
    decoded = codec.decode_image(png(rgb[:, :, ::-1]), LIMIT)  # OpenCV writes BGR
    np.testing.assert_array_equal(decoded, rgb)


def test_jpeg_decodes_to_its_size_and_roughly_its_colour() -> None:
    image = np.zeros((24, 40, 3), np.uint8)
    image[..., 0] = 200  # red, in RGB
    ok, buffer = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = buffer.tobytes()
    assert codec.header_size(data) == (24, 40)
    decoded = codec.decode_image(data, LIMIT)
    assert decoded.shape == (24, 40, 3)
    assert abs(int(decoded[..., 0].mean()) - 200) < 5 and decoded[..., 2].mean() < 10


@pytest.mark.parametrize(
    ("array", "expected_rgb"),
    [
        (np.full((4, 5), 77, np.uint8), (77, 77, 77)),  # gray
        (np.dstack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30, 0)]), (30, 20, 10)),  # BGRA
        (np.full((4, 5, 3), 0x8000, np.uint16), (128, 128, 128)),  # 16-bit
    ],
)
def test_gray_alpha_and_16_bit_become_rgb_uint8(
    array: np.ndarray, expected_rgb: tuple[int, int, int]
) -> None:
    decoded = codec.decode_image(png(array), LIMIT)
    assert decoded.shape == (4, 5, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0, 0], expected_rgb)


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", png(np.zeros((4, 4), np.uint8))[:40]]
)
def test_undecodable_bytes_are_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="empty|could not be decoded"):
        codec.decode_image(data, LIMIT)


def test_raw_image(rgb: np.ndarray) -> None:
    np.testing.assert_array_equal(codec.decode_raw_image(rgb.tobytes(), 20, 30, 3, LIMIT), rgb)
    gray = codec.decode_raw_image(bytes(range(6)), 2, 3, 1, LIMIT)
    assert gray.shape == (2, 3, 3) and gray[1, 2].tolist() == [5, 5, 5]


@pytest.mark.parametrize(
    ("length", "h", "w", "c", "match"),
    [(17, 2, 3, 3, "17 bytes.*2\\*3\\*3 = 18"), (12, 2, 3, 2, "channels=2"), (0, 0, 3, 3, "0x3")],
)
def test_raw_image_errors_say_what_was_expected(
    length: int, h: int, w: int, c: int, match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        codec.decode_raw_image(b"\x00" * length, h, w, c, LIMIT)


def test_pixel_limit_is_checked_from_the_png_header_before_decoding() -> None:
    real = png(np.zeros((4, 4), np.uint8))
    forged = real[:16] + struct.pack(">II", 50_000, 50_000) + real[24:]  # bad CRC: undecodable
    assert codec.header_size(forged) == (50_000, 50_000)
    with pytest.raises(ResourceExhausted, match="50000x50000"):
        codec.decode_image(forged, LIMIT)


def test_pixel_limit_after_decoding_for_headers_we_do_not_parse() -> None:
    ok, buffer = cv2.imencode(".ppm", np.zeros((30, 40, 3), np.uint8))
    assert codec.header_size(buffer.tobytes()) is None
    with pytest.raises(ResourceExhausted, match="30x40"):
        codec.decode_image(buffer.tobytes(), max_pixels=1000)
    with pytest.raises(ResourceExhausted):
        codec.decode_raw_image(b"\x00" * 3000, 30, 100, 1, max_pixels=1000)


def test_gray_png_mask_and_raw_mask() -> None:
    mask = np.random.default_rng(1).integers(0, 5, size=(9, 13), dtype=np.uint8)
    np.testing.assert_array_equal(codec.decode_mask(codec.encode_mask_png(mask), LIMIT), mask)
    np.testing.assert_array_equal(
        codec.decode_raw_mask(codec.encode_mask_raw(mask), 9, 13, LIMIT), mask
    )


def test_palette_png_mask_gives_indices_not_colours() -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0], [3, 3, 0]], np.uint8)
    palette = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (224, 224, 192)]
    np.testing.assert_array_equal(codec.decode_mask(palette_png(indices, palette), LIMIT), indices)


def test_colour_mask_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="3 channels.*single-channel"):
        codec.decode_mask(png(np.zeros((4, 4, 3), np.uint8)), LIMIT)


def test_16_bit_mask_out_of_8_bits_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="300"):
        codec.decode_mask(png(np.full((2, 2), 300, np.uint16)), LIMIT)
    ok = codec.decode_mask(png(np.full((2, 2), 7, np.uint16)), LIMIT)
    assert ok.dtype == np.uint8 and ok[0, 0] == 7


def test_raw_mask_of_wrong_length() -> None:
    with pytest.raises(InvalidArgument, match="5 bytes.*2\\*3 = 6"):
        codec.decode_raw_mask(b"\x00" * 5, 2, 3, LIMIT)


@pytest.mark.parametrize(
    "ext, params",
    [
        (".png", []),
        (".jpg", []),
        (".bmp", []),
        (".tiff", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),  # VP8 (lossy)
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # VP8L (lossless)
        (".gif", []),
    ],
)
def test_header_size_is_the_decoded_size(ext: str, params: list[int]) -> None:
    image = np.random.default_rng(0).integers(0, 255, (30, 41, 3), dtype=np.uint8)
    ok, buffer = cv2.imencode(ext, image, params)
    assert ok
    assert codec.header_size(buffer.tobytes()) == (30, 41)
    assert codec.decode_image(buffer.tobytes(), LIMIT).shape == (30, 41, 3)


def _tiff_header(order: str, big: bool, width: int, height: int, kind: int) -> bytes:
    """A TIFF whose first directory has ImageWidth/ImageLength (of ``kind``) after a
    tag we skip; classic or BigTIFF, either byte order."""
    value_format = {3: "H", 4: "I", 16: "Q"}[kind]
    slot = 8 if big else 4
    count_format, offset_format = ("Q", "Q") if big else ("H", "I")

    def entry(tag: int, entry_kind: int, fmt: str, value: int) -> bytes:
        packed = struct.pack(order + fmt, value).ljust(slot, b"\x00")
        return struct.pack(order + "HH" + ("Q" if big else "I"), tag, entry_kind, 1) + packed

    magic = (b"II" if order == "<" else b"MM") + struct.pack(order + "H", 43 if big else 42)
    head = magic + (struct.pack(order + "HHQ", 8, 0, 16) if big else struct.pack(order + "I", 8))
    ifd = struct.pack(order + count_format, 3)
    ifd += entry(254, 4, "I", 0)  # NewSubfileType
    ifd += entry(256, kind, value_format, width) + entry(257, kind, value_format, height)
    return head + ifd + struct.pack(order + offset_format, 0)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("big, kind", [(False, 3), (False, 4), (True, 4), (True, 16)])
def test_tiff_and_bigtiff_headers_in_either_byte_order(order: str, big: bool, kind: int) -> None:
    data = _tiff_header(order, big, 40_000, 30_000, kind)
    assert codec.header_size(data) == (30_000, 40_000)
    with pytest.raises(ResourceExhausted, match="30000x40000"):
        codec.decode_image(data, LIMIT)


def test_webp_canvas_and_gif_screen_bombs_are_refused_from_the_header() -> None:
    canvas = (16_383).to_bytes(3, "little") + (9_999).to_bytes(3, "little")  # sizes - 1
    vp8x = b"RIFF" + struct.pack("<I", 22) + b"WEBP" + b"VP8X" + struct.pack("<I", 10)
    vp8x += b"\x00" * 4 + canvas
    gif = b"GIF89a" + struct.pack("<HH", 65_535, 65_535) + b"\x00" * 16
    for data, size in ((vp8x, "10000x16384"), (gif, "65535x65535")):
        with pytest.raises(ResourceExhausted, match=size):
            codec.decode_image(data, LIMIT)


def test_truncated_headers_are_not_read_past_their_end() -> None:
    for data in (b"II*\x00\xff\xff\x00\x00", b"MM\x00+\x00\x08", b"RIFF\x00\x00\x00\x00WEBPVP8X"):
        assert codec.header_size(data) is None
        with pytest.raises(InvalidArgument, match="could not be decoded"):
            codec.decode_image(data, LIMIT)


def test_a_tiff_bomb_is_refused_without_being_decoded() -> None:
    """30000 x 30000 in under 1 MB: decoding it takes 0.9 GB (1.7 GB peak) and seconds."""
    data = tiff_bomb(30_000, 30_000)
    assert len(data) < 1_000_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="30000x30000 = 900000000 pixels"):
        codec.decode_image(data, 40_000_000)
    assert time.perf_counter() - started < 0.1
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 50


def test_opencv_refuses_what_the_codec_has_no_header_check_for() -> None:
    """A PGM declaring 30000 x 30000 (no header check here): OpenCV's own bound (set by
    tests/conftest.py as `visionserve serve` sets it) refuses it before allocating."""
    with pytest.raises(ResourceExhausted, match="declares more than the server's limit"):
        codec.decode_image(pgm_header(30_000, 30_000), LIMIT)
