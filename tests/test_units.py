import pytest

from memplan.errors import InvalidInput
from memplan.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * 2**20),
        ("16GiB", 16 * 2**30),
        ("2GB", 2 * 10**9),
        ("1048576", 1048576),
        ("1.5KiB", 1536),
        (" 3 gib ", 3 * 2**30),
        (4096, 4096),
        ("10b", 10),
    ],
)
def test_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-5", "1.5", "five MiB", "1e9"])
def test_parse_errors(text):
    with pytest.raises(InvalidInput, match="size"):
        parse_size(text)


def test_negative_int():
    with pytest.raises(InvalidInput, match="negative"):
        parse_size(-1)


def test_format():
    assert format_size(3 * 2**30 // 2) == "1.50 GiB"
    assert format_size(12) == "12 B"
