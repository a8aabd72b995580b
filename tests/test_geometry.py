import numpy as np

from lisplugin.core.geometry import ellipse_outline, mask_outline


def test_outline_of_a_disc_follows_its_edge() -> None:
    yy, xx = np.mgrid[0:40, 0:40]
    disc = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 <= 15**2
    outline = np.array(mask_outline(disc, (100, 200, 140, 240), points=16))
    radii = np.hypot(outline[:, 0] - 120, outline[:, 1] - 220)
    assert np.all(np.abs(radii - 15.5) < 1.5), radii


def test_empty_mask_falls_back_to_the_inscribed_ellipse() -> None:
    box = (0.0, 0.0, 20.0, 10.0)
    assert mask_outline(np.zeros((10, 20), bool), box, 8) == ellipse_outline(box, 8)
