"""Preprocessing equals the seed's: Cadene's TransformImage on PIL images."""
import numpy as np
import pytest
from PIL import Image

from nasq.data import preprocess_float, preprocess_u8, resized_size
from nasq.demo import make_image


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (331, 331), (378, 600), (1000, 379), (257, 999), (640, 427)])
def test_resized_size_matches_torchvision(size):
    import torchvision.transforms.functional as F

    img = Image.new("RGB", size)
    assert F.resize(img, 378).size == resized_size(*size, 378)


def test_matches_cadene_transformimage(tmp_path):
    from pretrainedmodels.models.nasnet import pretrained_settings
    from pretrainedmodels.utils import TransformImage

    tf = TransformImage(pretrained_settings["nasnetalarge"]["imagenet+background"])
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(500, 375), (375, 500), (800, 333), (340, 340), (612, 1024)]):
        path = tmp_path / f"{i}.JPEG"
        make_image(rng, w, h).save(path, quality=90)
        ref = tf(Image.open(path).convert("RGB")).numpy()
        ours = preprocess_float(str(path))
        assert ours.shape == ref.shape == (3, 331, 331)
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() <= 1 / 255  # the bound; in practice they are equal
        assert np.array_equal(ours, ref)


def test_grayscale_and_png_become_rgb(tmp_path):
    Image.new("L", (400, 300), 128).save(tmp_path / "g.JPEG")
    Image.new("RGBA", (300, 400), (10, 20, 30, 40)).save(tmp_path / "a.png")
    assert preprocess_u8(str(tmp_path / "g.JPEG")).shape == (331, 331, 3)
    assert preprocess_u8(str(tmp_path / "a.png"))[0, 0].tolist() == [10, 20, 30]
