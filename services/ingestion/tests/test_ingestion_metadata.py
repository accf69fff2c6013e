"""Metadata: front-matter mapping (over the whole EIP corpus), merging and validation."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from ledgerlens.runtime.errors import InvalidArgument
from ledgerlens.services.ingestion.metadata import (
    DocType,
    Metadata,
    from_front_matter,
    guess_doc_type,
    merge,
    split_authors,
    validate,
)

CHECKSUMMED = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # the EIP-55 test vector


def front_matter_of(path: Path) -> dict[str, object]:
    text = path.read_text("utf-8")
    assert text.startswith("---\n"), path
    data = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
    assert isinstance(data, dict)
    return data


def _commas(text: str) -> str:
    return re.sub(r"\s*,\s*", ",", text.strip()).strip(",")


def violation(exc: pytest.ExceptionInfo[InvalidArgument]) -> str:
    assert len(exc.value.violations) == 1
    return exc.value.violations[0][0]


# -- the corpus ---------------------------------------------------------------------


def test_every_eip_front_matter_maps_and_validates(corpus_dir: Path) -> None:
    files = sorted(corpus_dir.glob("eip-*.md"))
    assert len(files) >= 900
    for path in files:
        fm = front_matter_of(path)
        md = validate(from_front_matter(fm))
        assert md.doc_type is DocType.EIP, path
        assert md.chain == "ethereum"
        assert md.attributes["eip"] == str(fm["eip"])
        assert md.attributes["status"] == fm["status"]
        assert str(fm["status"]).lower().replace(" ", "-") in md.tags
        assert all(t == t.lower() and " " not in t for t in md.tags)
        assert "title" not in md.attributes
        assert "author" not in md.attributes
        if "title" in fm:
            assert md.title == fm["title"]
        if "created" in fm:
            created = fm["created"]
            assert isinstance(created, date)
            assert md.published_at == datetime(created.year, created.month, created.day, tzinfo=UTC)
            assert "created" not in md.attributes
        if "author" in fm:
            assert md.authors, path
            # a split never leaves brackets unbalanced
            for author in md.authors:
                assert author.count("(") == author.count(")"), (path, author)
                assert author.count("<") == author.count(">"), (path, author)
            # and loses nothing but the separators
            assert _commas(",".join(md.authors)) == _commas(str(fm["author"])), path


def test_eip_1559_maps_as_expected(corpus_dir: Path) -> None:
    md = from_front_matter(front_matter_of(corpus_dir / "eip-1559.md"))
    assert md.title == "Fee market change for ETH 1.0 chain"
    assert md.authors[0] == "Vitalik Buterin (@vbuterin)"
    assert len(md.authors) == 6
    assert md.published_at == datetime(2019, 4, 13, tzinfo=UTC)
    assert md.tags == ("core", "standards-track", "final")
    assert md.attributes["requires"] == "2718, 2930"
    assert md.attributes["discussions-to"].startswith("https://ethereum-magicians.org/")


# -- front matter -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "authors"),
    [
        (
            "Martin Becze <mb@ethereum.org>, Hudson Jameson <hudson@ethereum.org>, et al.",
            ["Martin Becze <mb@ethereum.org>", "Hudson Jameson <hudson@ethereum.org>", "et al."],
        ),
        (
            "Sam Wilson (@SamWilsn) <sam@binarycake.ca>, Francesco D'Amato <f@e.org>",
            ["Sam Wilson (@SamWilsn) <sam@binarycake.ca>", "Francesco D'Amato <f@e.org>"],
        ),
        ("A (@a, @b), B <b@x.org, c@y.org>", ["A (@a, @b)", "B <b@x.org, c@y.org>"]),
        ('"Doe, Jane" (@jd), Bob', ['"Doe, Jane" (@jd)', "Bob"]),
        ("Solo", ["Solo"]),
        (" , ,", []),
        ("Broken (@x, Other", ["Broken (@x, Other"]),
    ],
)
def test_split_authors(line: str, authors: list[str]) -> None:
    assert split_authors(line) == authors


def test_front_matter_types_become_attribute_strings() -> None:
    md = from_front_matter(
        {
            "eip": 7,
            "requires": [1, 2],
            "final": True,
            "last-call-deadline": date(2024, 1, 2),
            "nested": {"not": "scalar"},
            "empty": None,
            3: "int key",
            "tags": ["DeFi", "Layer 2"],
            "category": "Core",
        }
    )
    assert md.attributes == {
        "eip": "7",
        "requires": "1, 2",
        "final": "true",
        "last-call-deadline": "2024-01-02",
        "3": "int key",
        "category": "Core",
    }
    assert md.tags == ("core", "defi", "layer-2")


def test_non_eip_front_matter() -> None:
    md = from_front_matter({"title": "Post", "date": "2024-03-05T10:00:00+02:00", "tags": "a, B"})
    assert md.doc_type is None
    assert md.chain == ""
    assert md.published_at == datetime(2024, 3, 5, 8, tzinfo=UTC)
    assert md.tags == ("a", "b")
    assert md.attributes == {}


@pytest.mark.parametrize("created", ["2024-13-45", "last tuesday", 20240101, ""])
def test_unparseable_date_is_invalid_argument(created: object) -> None:
    with pytest.raises(InvalidArgument) as exc:
        from_front_matter({"eip": 1, "created": created})
    assert violation(exc) == "metadata.published_at"
    assert "date" in exc.value.message


def test_date_string_and_datetime_accepted() -> None:
    assert from_front_matter({"created": "2020-02-29"}).published_at == datetime(
        2020, 2, 29, tzinfo=UTC
    )
    local = datetime(2020, 1, 1, 12, tzinfo=timezone(timedelta(hours=-5)))
    assert from_front_matter({"created": local}).published_at == datetime(
        2020, 1, 1, 17, tzinfo=UTC
    )


# -- merge ----------------------------------------------------------------------------


def test_explicit_fields_win_over_front_matter() -> None:
    front = Metadata(
        doc_type=DocType.EIP,
        chain="ethereum",
        authors=("A",),
        published_at=datetime(2020, 1, 1, tzinfo=UTC),
        tags=("core",),
        title="Front",
        attributes={"eip": "1", "status": "Draft"},
    )
    explicit = Metadata(title="Explicit", tags=("mine",), attributes={"status": "Final"})
    merged = merge(front, explicit)
    assert merged.title == "Explicit"
    assert merged.tags == ("mine",)
    assert merged.authors == ("A",)
    assert merged.doc_type is DocType.EIP
    assert merged.chain == "ethereum"
    assert merged.published_at == front.published_at
    assert merged.attributes == {"eip": "1", "status": "Final"}
    assert merge(front, Metadata()) == front


# -- validate -------------------------------------------------------------------------


def test_validate_normalises() -> None:
    md = validate(
        Metadata(
            chain=" Polygon ",
            contract_addresses=(CHECKSUMMED.lower(), CHECKSUMMED, "0x" + CHECKSUMMED[2:].upper()),
            authors=(" A ",),
            tags=("DeFi", "defi"),
            title=" T ",
            published_at=datetime(2024, 1, 1, 12),
        )
    )
    assert md.chain == "polygon"
    assert md.contract_addresses == (CHECKSUMMED,)
    assert md.authors == ("A",)
    assert md.tags == ("defi",)
    assert md.title == "T"
    assert md.published_at == datetime(2024, 1, 1, 12, tzinfo=UTC)


def test_bad_checksum_names_the_address() -> None:
    bad = CHECKSUMMED[:-1] + CHECKSUMMED[-1].swapcase()
    with pytest.raises(InvalidArgument) as exc:
        validate(Metadata(contract_addresses=(CHECKSUMMED, CHECKSUMMED.lower(), bad)))
    assert violation(exc) == "metadata.contract_addresses[2]"
    assert "checksum" in exc.value.message


@pytest.mark.parametrize(
    "address", ["", "0x123", CHECKSUMMED[2:], "0x" + "g" * 40, CHECKSUMMED + "00"]
)
def test_malformed_address(address: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate(Metadata(contract_addresses=(address,)))
    assert violation(exc) == "metadata.contract_addresses[0]"


@pytest.mark.parametrize(
    ("md", "field_path"),
    [
        (Metadata(chain="c" * 65), "metadata.chain"),
        (Metadata(contract_addresses=(CHECKSUMMED,) * 101), "metadata.contract_addresses"),
        (Metadata(authors=("a",) * 101), "metadata.authors"),
        (Metadata(authors=("a", "b" * 257)), "metadata.authors[1]"),
        (Metadata(authors=("a", " ")), "metadata.authors[1]"),
        (Metadata(tags=tuple(f"t{i}" for i in range(51))), "metadata.tags"),
        (Metadata(tags=("ok", "t" * 65)), "metadata.tags[1]"),
        (Metadata(title="t" * 513), "metadata.title"),
        (Metadata(attributes={f"k{i}": "v" for i in range(51)}), "metadata.attributes"),
        (Metadata(attributes={"k": "v" * 1025}), "metadata.attributes"),
    ],
)
def test_limits(md: Metadata, field_path: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate(md)
    assert violation(exc) == field_path
    assert "at most" in exc.value.message or "empty" in exc.value.message


def test_limits_at_the_edge_pass() -> None:
    validate(
        Metadata(
            chain="c" * 64,
            contract_addresses=(CHECKSUMMED,) * 100,
            authors=(*tuple(f"a{i}" for i in range(99)), "b" * 256),
            tags=(*tuple(f"t{i}" for i in range(49)), "t" * 64),
            title="t" * 512,
            attributes={f"k{i}": "v" * 1024 for i in range(50)},
        )
    )


def test_field_prefix() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate(Metadata(chain="c" * 65), field_prefix="document.metadata")
    assert violation(exc) == "document.metadata.chain"


# -- doc type ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "content_type", "expected"),
    [
        ("https://eips.ethereum.org/EIPS/eip-1559", "text/html", DocType.EIP),
        ("https://github.com/ethereum/EIPs/blob/master/EIPS/eip-1.md", "", DocType.EIP),
        ("https://github.com/ethereum/ERCs/blob/master/ERCS/erc-20.md", "", DocType.EIP),
        ("https://github.com/uniswap/v4-core/blob/main/README.md", "", DocType.GITHUB),
        ("https://ethresear.ch/t/some-post/123", "text/html", DocType.FORUM),
        ("https://ethereum-magicians.org/t/eip-1559/2783", "text/html", DocType.FORUM),
        ("https://bitcoin.org/bitcoin.pdf", "application/pdf", DocType.WHITEPAPER),
        ("https://example.org/paper", "application/pdf; charset=binary", DocType.WHITEPAPER),
        ("https://example.org/post", "text/html", DocType.OTHER),
        ("not a url", "", DocType.OTHER),
    ],
)
def test_guess_doc_type(url: str, content_type: str, expected: DocType) -> None:
    assert guess_doc_type(url, content_type) is expected
