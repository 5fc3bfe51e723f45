import pytest

from inference.sizing import output_size

# (input w, h) -> expected for "1", "0.25", "match_input": the hosted model's rules.
SHAPES = [
    ((1024, 768), (1152, 864), (576, 416), (1024, 768)),
    ((1920, 1080), (1344, 768), (672, 384), (1440, 800)),
    ((1024, 1024), (1024, 1024), (512, 512), (1024, 1024)),
    ((512, 512), (1024, 1024), (512, 512), (512, 512)),  # small images are upscaled
    ((64, 64), (1024, 1024), (512, 512), (64, 64)),
    ((4000, 3000), (1182 // 32 * 32, 886 // 32 * 32), (591 // 32 * 32, 443 // 32 * 32), (1440, 1056)),
    ((3000, 4000), (864, 1152), (416, 576), (1056, 1440)),
    ((1000, 250), (2048, 512), (1024, 256), (992, 224)),  # no 1440 cap in megapixel mode
    ((1441, 100), (3872, 256), (1920, 128), (1440, 96)),
    ((100, 3000), (160, 5600), (64, 2784), (32, 1440)),
    ((33, 33), (1024, 1024), (512, 512), (32, 32)),
]


@pytest.mark.parametrize("size,one,quarter,match", SHAPES)
def test_output_size_follows_hosted_rules(size, one, quarter, match):
    assert output_size(*size, "1") == one
    assert output_size(*size, "0.25") == quarter
    assert output_size(*size, "match_input") == match


@pytest.mark.parametrize("size", [s for s, *_ in SHAPES])
@pytest.mark.parametrize("mode", ["1", "0.25", "match_input"])
def test_sides_are_multiples_of_32(size, mode):
    w, h = output_size(*size, mode)
    assert w % 32 == 0 and h % 32 == 0 and w >= 32 and h >= 32


def test_unknown_megapixels_is_refused():
    with pytest.raises(ValueError):
        output_size(100, 100, "2")
