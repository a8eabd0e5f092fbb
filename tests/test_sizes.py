import pytest

from engine.sizes import KONTEXT_RESOLUTIONS, closest_kontext_resolution, output_size, parse_aspect_ratio


def test_seventeen_preferred_resolutions_near_one_megapixel():
    assert len(KONTEXT_RESOLUTIONS) == 17
    for width, height in KONTEXT_RESOLUTIONS:
        assert width % 16 == 0 and height % 16 == 0
        assert 0.95e6 < width * height < 1.1e6


def test_aspect_ratio_parsing():
    assert parse_aspect_ratio("1392x752") == (1392, 752)
    assert parse_aspect_ratio("1:1") == (1024, 1024)
    assert parse_aspect_ratio("16:9") == closest_kontext_resolution(16 / 9)
    with pytest.raises(ValueError, match="preferred resolutions"):
        parse_aspect_ratio("1000x1000")
    with pytest.raises(ValueError):
        parse_aspect_ratio("wide")


def test_output_size_rules():
    # explicit sizes win, rounded down to multiples of 16
    assert output_size(1000, 500, None, 1024**2) == (992, 496)
    # otherwise the preferred resolution closest to the input's aspect ratio
    assert output_size(None, None, (3000, 2000), 1024**2) == closest_kontext_resolution(1.5)
    # scaled to a smaller pixel budget, keeping the aspect ratio
    width, height = output_size(None, None, (2000, 3000), 256 * 256)
    assert width % 16 == 0 and height % 16 == 0 and height > width
    # text-only generation: square
    assert output_size(None, None, None, 1024**2) == (1024, 1024)
    with pytest.raises(ValueError, match="both width and height"):
        output_size(512, None, None, 1024**2)


def test_at_kontexts_own_budget_every_preferred_resolution_is_kept():
    for width, height in KONTEXT_RESOLUTIONS:
        assert output_size(None, None, (width * 3, height * 3), 1024 * 1024) == (width, height)
        assert output_size(None, None, (width, height), 256 * 256)[0] * output_size(None, None, (width, height), 256 * 256)[1] <= 256 * 256


def test_the_preferred_resolutions_are_diffusers_own():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert KONTEXT_RESOLUTIONS == tuple(PREFERRED_KONTEXT_RESOLUTIONS)
