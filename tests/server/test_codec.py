"""Decoding images and masks (PNG, JPEG, raw, palette), encoding masks, size limits."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

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
    ok, buffer = cv2.imencode(".tiff", np.zeros((30, 40, 3), np.uint8))
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
