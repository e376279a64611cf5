"""User images of every kind either become RGB or are refused with a clear reason."""
import io

import numpy as np
import pytest
from PIL import Image

from eval.images import ImageError, downsize, load_image, pad_to_square


def png_bytes(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_every_common_mode_loads_as_rgb(mode):
    img = Image.new(mode, (40, 30))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = load_image(png_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_keeps_its_contrast():
    arr = np.array([[0, 65535]], dtype=np.uint16)
    out = load_image(Image.fromarray(arr, mode="I;16"))
    assert out.getpixel((0, 0))[0] == 0 and out.getpixel((1, 0))[0] == 255


def test_a_text_file_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not really a png")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


def test_a_truncated_png_is_refused():
    data = png_bytes(Image.effect_noise((200, 200), 50))
    with pytest.raises(ImageError):
        load_image(data[: len(data) // 2])


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = png_bytes(Image.new("L", (10_000, 10_000)))     # 100 MP of zeros compresses to ~100 KB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_pad_to_square_keeps_the_whole_image_centred():
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    square = pad_to_square(img, fill=(255, 255, 255))
    assert square.size == (100, 100)
    assert square.getpixel((50, 10)) == (255, 255, 255) and square.getpixel((50, 50)) == (10, 20, 30)


def test_downsize_never_enlarges():
    assert downsize(Image.new("RGB", (100, 50)), 400).size == (100, 50)
    assert downsize(Image.new("RGB", (1000, 500)), 400).size == (400, 200)


def test_a_huge_bomb_past_pils_own_limit_gets_the_same_clear_message():
    bomb = png_bytes(Image.new("1", (20_000, 10_000)))
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb)


def test_a_long_thin_png_is_refused_from_its_header_before_padding_squares_it():
    # 20000x10 is only 0.2 MP, but pad-to-square would make it 400 MP (6.5 GB of studio memory).
    bomb = png_bytes(Image.new("L", (20_000, 10)))
    assert len(bomb) < 2_000
    for size in ((20_000, 10), (10, 40_000)):
        with pytest.raises(ImageError, match="each side may be at most"):
            load_image(png_bytes(Image.new("L", size)))


def test_pad_to_square_refuses_an_image_whose_square_would_be_a_bomb():
    with pytest.raises(ImageError, match="each side"):
        pad_to_square(Image.new("RGB", (20_000, 10)))
    assert pad_to_square(Image.new("RGB", (6_000, 10))).size == (6_000, 6_000)


def test_a_missing_file_message_does_not_show_its_folder(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "gradio" / "abc123" / "chart.png")
    assert "chart.png" in str(e.value) and str(tmp_path) not in str(e.value)
