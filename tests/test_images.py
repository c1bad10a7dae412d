import warnings

import numpy as np
import pytest
from PIL import Image

from gmner.core.images import BadImage, load_image


def _kind(path, **kw) -> str:
    with pytest.raises(BadImage) as info:
        load_image(path, **kw)
    assert str(path) in str(info.value)
    return info.value.kind


def _pixel(loaded, xy=(0, 0)):
    return loaded.image.getpixel(xy)


def test_missing_file(tmp_path):
    assert _kind(tmp_path / "nope.jpg") == "missing_image"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    assert _kind(path) == "empty_image"


def test_non_image_bytes_with_jpg_name(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_bytes(b"<html>not an image</html>\n" * 10)
    assert _kind(path) == "not_an_image"


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadImage, match="truncated") as info:
        load_image(path)
    assert info.value.kind == "corrupt_image"


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(path, quality=100)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB" and loaded.image.size == (16, 8)
    r, g, b = _pixel(loaded, (8, 4))
    assert r > 200 and g < 60 and b < 60


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (10, 6), 77).save(path)
    loaded = load_image(path)
    assert loaded.image.mode == "RGB" and _pixel(loaded) == (77, 77, 77)


def test_rgba_transparency_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (0, 0, 255, 255))
    img.save(path)
    loaded = load_image(path)
    assert _pixel(loaded, (0, 0)) == (255, 255, 255)
    assert _pixel(loaded, (1, 1)) == (0, 0, 255)


def test_palette_transparency_composited_on_white(tmp_path):
    path = tmp_path / "pal.png"
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((2, 2), 1)
    img.info["transparency"] = 0
    img.save(path, transparency=0)
    loaded = load_image(path)
    assert _pixel(loaded, (0, 0)) == (255, 255, 255)
    assert _pixel(loaded, (2, 2)) == (0, 255, 0)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((5, 7), 40000, dtype=np.uint16)).save(path)
    loaded = load_image(path)
    assert loaded.image.size == (7, 5)
    assert _pixel(loaded) == (156, 156, 156)  # 40000 / 257, not PIL's clip to 255


def test_animated_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, b = _pixel(load_image(path))
    assert r > 200 and b < 50


def test_exif_rotation_applied_and_sizes_after_rotation(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(path, exif=exif, quality=100)
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (20, 40) and loaded.image.size == (20, 40)
    top, bottom = _pixel(loaded, (10, 5)), _pixel(loaded, (10, 35))
    assert top[0] > 200 and bottom[2] > 200  # the stored left half is on top once displayed


def test_decompression_bomb_by_param(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (2000, 1000)).save(path)
    with pytest.raises(BadImage, match="max_pixels=1000000") as info:
        load_image(path, max_pixels=1_000_000)
    assert info.value.kind == "decompression_bomb"


def test_pil_bomb_limits_never_leak_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn_size, error_size = tmp_path / "w.png", tmp_path / "e.png"
    Image.new("RGB", (12, 12)).save(warn_size)  # 144 px: PIL would warn
    Image.new("RGB", (20, 20)).save(error_size)  # 400 px: PIL refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(warn_size).image.size == (12, 12)
        assert _kind(error_size) == "decompression_bomb"


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_huge_image_downscaled_and_boxes_map_back(tmp_path, fmt):
    path = tmp_path / f"huge.{fmt}"
    img = Image.new("RGB", (2400, 1600), (0, 0, 0))
    img.paste((255, 255, 255), (800, 400, 1600, 1200))
    img.save(path)
    loaded = load_image(path, max_side=300)
    assert (loaded.width, loaded.height) == (2400, 1600)
    assert loaded.image.size == (300, 200)
    assert loaded.scale == (0.125, 0.125)
    mask = np.asarray(loaded.image)[..., 0] > 128
    ys, xs = np.nonzero(mask)
    box = loaded.to_original([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])[0]
    np.testing.assert_allclose(box, [800, 400, 1600, 1200], atol=16)
    assert box.dtype == np.float32


def test_to_original_clips_to_the_image(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded.to_original([[-5, 2, 50, 40]]), [[0, 2, 30, 20]])
