"""Hypothesis strategies that build protobuf messages from their descriptors.

Hand-written on purpose: the libraries that did this (``hypothesis-protobuf``,
``protobuf-hypothesis``) are unmaintained and target protobuf 3.x's pure-Python
descriptors; none supports protobuf 5's upb runtime. What is here is small: one
strategy per ``FieldDescriptor`` type, recursion over message fields (depth-limited),
real oneofs (one member or none), proto3 ``optional`` (present or not), maps, repeated
fields (a few items, or just over the usual 64-item limits) and ``Timestamp`` (inside
and outside its valid range).

:func:`messages` generates whole requests; :func:`mutations` starts from a valid request
and changes one field (possibly nested), so validation past the first check is reached.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

__all__ = ["field_values", "is_map", "messages", "mutations", "set_field"]

#: nested messages deeper than this are left unset (recursion stops)
MAX_DEPTH = 3

_T = FieldDescriptor

_INT_RANGES = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_FIXED32: (0, 2**32 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
    _T.TYPE_FIXED64: (0, 2**64 - 1),
}

#: strings a service is likely to look at closely: ids, URLs, hex, JSON, scopes, dates
_PLAUSIBLE_STRINGS = [
    "",
    " ",
    "a",
    "acme",
    "admin",
    "search:read",
    "ES256",
    "text/markdown",
    "application/pdf",
    "https://example.org/doc.md",
    "file:///etc/passwd",
    "ipfs://bafy",
    "/relative/path",
    "0x" + "a" * 40,
    "0x52908400098527886E0F7030069857D2E4169EE7",
    "0xZZ",
    "f" * 64,
    "F" * 64,
    "doc_0000",
    "llk_x",
    "1:abc",
    "-1",
    "2026-02-30T00:00:00Z",
    "null",
    "{}",
    "[",
    "%s%n%x",
    "' OR 1=1 --",
    "../../..",
    "a.b.c",
    "Bearer x",
    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
]

#: strings that break naive code: NUL and other controls, surrogate-free astral
#: characters, U+10FFFF, BOM, RTL override, combining marks, lone whitespace
_NASTY_STRINGS = [
    "\x00",
    "a\x00b",
    "\r\n",
    "\x1b[31m",
    "\ufeff",
    "\u202e",
    "\U0010ffff",
    "\U0001f600" * 3,
    "e\u0301",
    "\t \n",
    "\u2028",
]

#: very long strings: just over the usual limits (128, 256, 2000, 2048) and far over
_LONG_STRINGS = [("x", 129), ("y", 257), ("q ", 1001), ("h", 2049), ("\u00e9", 4100), ("z", 20_000)]

_PLAUSIBLE_BYTES = [
    b"",
    b"\x00",
    b"\xff\xfe\x00",
    b"# Title\n\nA short note about rollups.\n",
    b"---\ntitle: [unclosed\n---\n# x\n",
    b"---\npublished_at: not-a-date\ncontract_addresses: [0xZZ]\n---\nbody\n",
    b"<html><body><p>hello</p></body></html>",
    b"%PDF-1.4\n%broken\n",
    b"\xef\xbb\xbfBOM text\r\n",
    b"{}",
]


def _text() -> st.SearchStrategy[str]:
    # protobuf strings must be valid UTF-8: no surrogates
    return st.text(st.characters(codec="utf-8"), max_size=40)


def _string_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_PLAUSIBLE_STRINGS),
        _text(),
        st.sampled_from(_NASTY_STRINGS),
        st.sampled_from(_LONG_STRINGS).map(lambda pair: pair[0] * pair[1]),
    )


def _bytes_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(_PLAUSIBLE_BYTES),
        st.binary(max_size=64),
        st.text(st.characters(codec="utf-8"), max_size=200).map(str.encode),
        # large contents, built on demand (a sampled constant this big bloats reprs)
        st.sampled_from([40_000, 150_000]).map(lambda n: b"# big\n\n" + b"word " * (n // 5)),
    )


def _int_values(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({low, high, 0, 1, -1 if low < 0 else 2, 64, 65, 100, 101, 500, 501})
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high)
    )


def _timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    valid = st.builds(
        timestamp_pb2.Timestamp,
        seconds=st.integers(-62_135_596_800, 253_402_300_799),
        nanos=st.integers(0, 999_999_999),
    )
    # out of the range Timestamp allows (year 1..9999, nanos 0..999999999): a servicer
    # converting them must refuse, not crash
    invalid = st.builds(
        timestamp_pb2.Timestamp,
        seconds=_int_values(-(2**63), 2**63 - 1),
        nanos=_int_values(-(2**31), 2**31 - 1),
    )
    edges = st.sampled_from(
        [
            timestamp_pb2.Timestamp(),
            timestamp_pb2.Timestamp(seconds=1_767_225_600),  # 2026-01-01
            timestamp_pb2.Timestamp(seconds=-62_135_596_800),
            timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999),
        ]
    )
    return st.one_of(edges, valid, invalid)


def is_map(field: FieldDescriptor) -> bool:
    return (
        field.type == _T.TYPE_MESSAGE
        and field.message_type is not None
        and field.message_type.GetOptions().map_entry
    )


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.label == _T.LABEL_REPEATED)


def _single_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        return _int_values(*_INT_RANGES[kind])
    if kind == _T.TYPE_FLOAT:
        return st.one_of(
            st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 1.5, float("nan"), float("inf")]),
            st.floats(width=32),
        )
    if kind == _T.TYPE_DOUBLE:
        return st.floats()
    if kind == _T.TYPE_BOOL:
        return st.booleans()
    if kind == _T.TYPE_STRING:
        return _string_values()
    if kind == _T.TYPE_BYTES:
        return _bytes_values()
    if kind == _T.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        # proto3 enums are open: an unknown number goes over the wire as is
        return st.one_of(st.sampled_from(known), _int_values(-(2**31), 2**31 - 1))
    if kind == _T.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


def field_values(field: FieldDescriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for ``field``: a list for repeated, a dict for maps, else one value."""
    if is_map(field):
        entry = field.message_type
        keys = _single_value(entry.fields_by_name["key"], depth)
        values = _single_value(entry.fields_by_name["value"], depth)
        return st.one_of(
            st.dictionaries(keys, values, max_size=3),
            # just over a 64-entry limit, all cheap
            values.map(lambda v: {str(i): v for i in range(65)}),
        )
    item = _single_value(field, depth)
    if _is_repeated(field):
        return st.one_of(
            st.lists(item, max_size=3),
            # just over the usual 64-item limit: one drawn item repeated (cheap to make)
            item.map(lambda v: [v] * 65),
        )
    return item


def set_field(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set ``field`` of ``message`` to ``value`` (as :func:`field_values` makes them)."""
    name = field.name
    if is_map(field):
        target = getattr(message, name)
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.type == _T.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(field):
        getattr(message, name).extend(value)
    elif field.type == _T.TYPE_MESSAGE:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def _real_oneofs(descriptor: Descriptor) -> list[OneofDescriptor]:
    """Oneofs that are not proto3 ``optional`` (a synthetic oneof of one field ``_x``)."""
    return [
        o
        for o in descriptor.oneofs
        if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)
    ]


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of type ``descriptor``: any subset of fields set to fuzzed values."""
    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return _timestamps()
    if depth > MAX_DEPTH:
        return st.just(cls())
    oneofs = _real_oneofs(descriptor)
    in_oneof = {f.name for o in oneofs for f in o.fields}
    plain = {
        f.name: st.deferred(lambda f=f: field_values(f, depth))
        for f in descriptor.fields
        if f.name not in in_oneof
    }
    choices = [
        st.one_of(
            st.none(),
            *(
                st.tuples(st.just(f), st.deferred(lambda f=f: field_values(f, depth)))
                for f in o.fields
            ),
        )
        for o in oneofs
    ]

    def build(values: dict[str, Any], chosen: tuple[Any, ...]) -> Message:
        message = cls()
        for name, value in values.items():
            set_field(message, descriptor.fields_by_name[name], value)
        for pick in chosen:
            if pick is not None:
                set_field(message, pick[0], pick[1])
        return message

    return st.builds(build, st.fixed_dictionaries({}, optional=plain), st.tuples(*choices))


@st.composite
def mutations(draw: st.DrawFn, valid: Message) -> Message:
    """``valid`` with one field (top level, or inside a set sub-message) replaced by a
    fuzzed value, or cleared."""
    message = type(valid)()
    message.CopyFrom(valid)
    target = message
    while True:
        fields = list(target.DESCRIPTOR.fields)
        if not fields:
            return message
        field = draw(st.sampled_from(fields))
        nested = (
            field.type == _T.TYPE_MESSAGE
            and not _is_repeated(field)
            and field.message_type.full_name != "google.protobuf.Timestamp"
            and target.HasField(field.name)
        )
        if nested and draw(st.booleans()):
            target = getattr(target, field.name)
            continue
        break
    target.ClearField(field.name)
    if draw(st.integers(0, 4)):  # mostly replace, sometimes just clear
        set_field(target, field, draw(field_values(field)))
    return message
