import numpy as np

from lisplugin.core.geometry import ellipse_outline, mask_outline, polygon_area


def test_outline_of_a_disc_follows_its_edge() -> None:
    yy, xx = np.mgrid[0:40, 0:40]
    disc = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 <= 15**2
    outline = np.array(mask_outline(disc, (100, 200, 140, 240), points=16))
    radii = np.hypot(outline[:, 0] - 120, outline[:, 1] - 220)
    assert np.all(np.abs(radii - 15.5) < 1.5), radii


def test_empty_mask_falls_back_to_the_inscribed_ellipse() -> None:
    box = (0.0, 0.0, 20.0, 10.0)
    assert mask_outline(np.zeros((10, 20), bool), box, 8) == ellipse_outline(box, 8)


def test_outline_keeps_to_the_cell_not_to_a_neighbours_fragment() -> None:
    """A mask with a few pixels of the neighbouring cell in the box corner: the outline traces
    the cell, without the star point a ray to the fragment would make."""
    yy, xx = np.mgrid[0:40, 0:40]
    mask = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 <= 14**2
    mask[0:3, 36:40] = True  # a neighbour's edge inside the box
    outline = np.array(mask_outline(mask, (100, 200, 140, 240)))
    radii = np.hypot(outline[:, 0] - 120, outline[:, 1] - 220)
    assert radii.max() < 15.5, radii.max()
    assert abs(polygon_area(outline[:, 0], outline[:, 1]) - np.pi * 14**2) < 0.05 * np.pi * 14**2


def test_white_point_is_the_median_of_the_brightest_tenth() -> None:
    """The histogram-based white point equals its definition computed with np.quantile."""
    from lisplugin.core.crops import WHITE_QUANTILE, white_point

    rng = np.random.default_rng(5)
    for clip in (False, True):
        image = rng.integers(0, 256, (61, 47, 3), dtype=np.uint8)
        if clip:
            image[:20] = 255  # saturated glass: left out while enough other pixels remain
        rgb = image.reshape(-1, 3).astype(np.float32)
        unclipped = rgb[rgb.max(axis=1) < 254]
        rgb = unclipped if len(unclipped) >= 0.05 * len(rgb) else rgb
        grey = rgb.sum(axis=1)
        expected = np.median(rgb[grey >= np.quantile(grey, WHITE_QUANTILE)], axis=0)
        np.testing.assert_array_equal(white_point(image), np.maximum(expected, 1.0))
