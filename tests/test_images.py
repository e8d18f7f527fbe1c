"""Every image mode decodes to the right 8-bit RGB (issue 26, item 4): 16-bit greyscale and RGB, palette with and
without transparency, CMYK, alpha composited over white, 1-bit, greyscale and float images. Each expected value is
worked out by hand in the comment beside it."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data.datasets import load_rgb, to_rgb8


def png(width: int, height: int, depth: int, colour_type: int, rows: list[bytes], *extra: bytes) -> bytes:
    """A PNG written byte by byte (so 16-bit files need no encoder support): filter 0 on every row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + b"".join(chunk(kind, data) for kind, data in extra)
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def decoded(data: bytes, tmp_path, name: str = "image.png") -> list:
    """The pixels load_rgb (the one decoder the data sets use) gives for the file `data`, as nested lists."""
    path = tmp_path / name
    path.write_bytes(data)
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image).tolist()


def pixels(image: Image.Image) -> list:
    converted = to_rgb8(image)
    assert converted.mode == "RGB"
    return np.asarray(converted).tolist()


def test_a_16_bit_greyscale_png_keeps_its_grey_levels(tmp_path):
    # 16-bit v -> round(v / 257): 0 -> 0, 32896 = 128 * 257 -> 128, 65535 -> 255, 257 -> 1, 1000 -> 3.89 -> 4
    data = png(5, 1, 16, 0, [struct.pack(">5H", 0, 32896, 65535, 257, 1000)])
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I;16")  # what Pillow gives (it used to make every such pixel 255: white)
    assert decoded(data, tmp_path) == [[[0] * 3, [128] * 3, [255] * 3, [1] * 3, [4] * 3]]


@pytest.mark.parametrize("mode", ["I", "I;16", "I;16B", "I;16L"])
def test_every_16_bit_integer_mode_is_read_on_the_16_bit_scale(mode):
    image = Image.new(mode, (3, 1))
    for x, value in enumerate((32896, 65535, 514)):
        image.putpixel((x, 0), value)
    assert pixels(image) == [[[128] * 3, [255] * 3, [2] * 3]]  # 514 = 2 * 257


def test_a_32_bit_integer_image_is_clipped_to_the_16_bit_range():
    image = Image.new("I", (2, 1))
    image.putpixel((0, 0), -5)
    image.putpixel((1, 0), 100_000)
    assert pixels(image) == [[[0] * 3, [255] * 3]]


def test_a_16_bit_rgb_png_keeps_its_colours(tmp_path):
    # (65535, 32896, 0) -> (255, 128, 0); (257, 0, 65535) -> (1, 0, 255)
    data = png(2, 1, 16, 2, [struct.pack(">6H", 65535, 32896, 0, 257, 0, 65535)])
    assert decoded(data, tmp_path) == [[[255, 128, 0], [1, 0, 255]]]


def test_a_16_bit_rgba_png_is_composited_over_white(tmp_path):
    # (65535, 0, 0, alpha 32896) -> (255, 0, 0, alpha 128); over white c * 128/255 + 255 * 127/255:
    # red 255, green and blue 0 + 127 = 127
    data = png(1, 1, 16, 6, [struct.pack(">4H", 65535, 0, 0, 32896)])
    assert decoded(data, tmp_path) == [[[255, 127, 127]]]


def test_rgba_is_composited_over_white():
    image = Image.new("RGBA", (4, 1))
    image.putpixel((0, 0), (255, 0, 0, 128))  # -> (255, 127, 127) as above
    image.putpixel((1, 0), (10, 20, 30, 255))  # opaque: unchanged
    image.putpixel((2, 0), (10, 20, 30, 0))  # transparent: white
    image.putpixel((3, 0), (100, 0, 200, 51))  # 100*51/255 + 255*204/255 = 20 + 204 = 224; 0 + 204; 40 + 204 = 244
    assert pixels(image) == [[[255, 127, 127], [10, 20, 30], [255, 255, 255], [224, 204, 244]]]


def test_grey_with_alpha_is_composited_over_white(tmp_path):
    # LA (128, alpha 128): (128*128 + 255*127) / 255 = 48769 / 255 = 191.25 -> 191
    image = Image.new("LA", (1, 1), (128, 128))
    assert pixels(image) == [[[191] * 3]]
    # the same through an 8-bit grey+alpha PNG file
    assert decoded(png(1, 1, 8, 4, [bytes([128, 128])]), tmp_path) == [[[191] * 3]]


def test_premultiplied_alpha_is_composited_over_white():
    # RGBa (128, 0, 0, alpha 128) is RGBA (255, 0, 0, 128) premultiplied -> (255, 127, 127)
    image = Image.new("RGBa", (1, 1), (128, 0, 0, 128))
    assert pixels(image) == [[[255, 127, 127]]]


def palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([0, 0, 0, 10, 200, 30, 250, 5, 60])
    for x in range(3):
        image.putpixel((x, 0), x)
    return image


def test_a_palette_image_gives_its_palette_colours(tmp_path):
    assert pixels(palette_image()) == [[[0, 0, 0], [10, 200, 30], [250, 5, 60]]]
    buffer = io.BytesIO()
    palette_image().save(buffer, "PNG")
    assert decoded(buffer.getvalue(), tmp_path) == [[[0, 0, 0], [10, 200, 30], [250, 5, 60]]]


def test_a_palette_image_with_a_transparent_entry_shows_white_there(tmp_path):
    buffer = io.BytesIO()
    palette_image().save(buffer, "PNG", transparency=0)  # entry 0 transparent: black would show without alpha
    assert decoded(buffer.getvalue(), tmp_path) == [[[255, 255, 255], [10, 200, 30], [250, 5, 60]]]
    buffer = io.BytesIO()
    palette_image().save(buffer, "GIF", transparency=2)
    assert decoded(buffer.getvalue(), tmp_path, "image.gif") == [[[0, 0, 0], [10, 200, 30], [255, 255, 255]]]


def test_a_palette_with_partial_alpha_is_composited(tmp_path):
    # tRNS gives entry 1 alpha 51: (10, 200, 30) -> 10*51/255 + 204 = 206; 200*51/255 + 204 = 244; 6 + 204 = 210
    palette = bytes([0, 0, 0, 10, 200, 30, 250, 5, 60])
    data = png(3, 1, 8, 3, [bytes([0, 1, 2])], (b"PLTE", palette), (b"tRNS", bytes([255, 51])))
    assert decoded(data, tmp_path) == [[[0, 0, 0], [206, 244, 210], [250, 5, 60]]]


def test_an_rgb_png_with_a_transparent_colour_shows_white_there(tmp_path):
    data = png(2, 1, 8, 2, [bytes([1, 2, 3, 4, 5, 6])], (b"tRNS", struct.pack(">3H", 4, 5, 6)))
    assert decoded(data, tmp_path) == [[[1, 2, 3], [255, 255, 255]]]


# CMYK (10, 20, 30, 40): R = 255 (1 - C/255)(1 - K/255) = 245 * 215 / 255 = 206.57 -> 207, G = 235 * 215 / 255 =
# 198.14 -> 198, B = 225 * 215 / 255 = 189.71 -> 190
CMYK, CMYK_AS_RGB = (10, 20, 30, 40), [207, 198, 190]


def test_cmyk_is_converted_by_the_usual_formula(tmp_path):
    assert pixels(Image.new("CMYK", (1, 1), CMYK)) == [[CMYK_AS_RGB]]
    buffer = io.BytesIO()
    Image.new("CMYK", (1, 1), CMYK).save(buffer, "TIFF")
    assert decoded(buffer.getvalue(), tmp_path, "image.tif") == [[CMYK_AS_RGB]]


def test_a_cmyk_jpeg_is_converted_by_the_usual_formula(tmp_path):
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), CMYK).save(buffer, "JPEG", quality=100)  # one flat block: lossless but for rounding
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert image.mode == "CMYK"
    got = np.asarray(decoded(buffer.getvalue(), tmp_path, "image.jpg"))
    assert got.shape == (8, 8, 3)
    assert np.abs(got - np.array(CMYK_AS_RGB)).max() <= 1


def test_one_bit_and_grey_images():
    bits = Image.new("1", (2, 1))
    bits.putpixel((0, 0), 1)
    assert pixels(bits) == [[[255] * 3, [0] * 3]]
    grey = Image.new("L", (2, 1))
    grey.putpixel((0, 0), 77)
    assert pixels(grey) == [[[77] * 3, [0] * 3]]


def test_float_images_in_0_1_are_scaled_and_others_are_clipped():
    # every value in [0, 1]: the 0-1 scale, 0.5 * 255 = 127.5 -> 128 (to even), 0.2 * 255 = 51, 1 -> 255
    unit = Image.fromarray(np.array([[0.0, 0.5, 0.2, 1.0]], dtype=np.float32))
    assert unit.mode == "F" and pixels(unit) == [[[0] * 3, [128] * 3, [51] * 3, [255] * 3]]
    # else the 0-255 scale, clipped; NaN is 0
    wide = Image.fromarray(np.array([[-3.0, 100.4, 300.0, np.nan, 0.5]], dtype=np.float32))
    assert pixels(wide) == [[[0] * 3, [100] * 3, [255] * 3, [0] * 3, [0] * 3]]


def test_rgb_is_unchanged():
    colours = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    image = Image.fromarray(colours)
    assert image.mode == "RGB" and pixels(image) == colours.tolist()
