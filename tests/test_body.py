"""Reading request bodies the way a backend would: Content-Encoding undone, JSON text in any RFC encoding."""

from __future__ import annotations

import codecs
import gzip
import json
import random
import struct
import zlib

import pytest

from sidecar.body import MAX_LAYERS, BodyText, decode_text, decompress, detect_encoding
from sidecar.errors import BodyTooLarge, NotUtf8, UnsupportedEncoding

BODY = '{"model":"auto","messages":[{"role":"user","content":"Mail jane.doe@example.com, café 中文 😀"}]}'
RAW = BODY.encode()
LIMIT = 1 << 20


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def zeros_gzip(megabytes: int) -> bytes:
    """A valid gzip of that many MiB of zeros, built without compressing them all: one fully flushed
    deflate segment per MiB, repeated (each is ~1 KB)."""
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(chunk, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    final_block = b"\x03\x00"
    return header + segment * megabytes + final_block + struct.pack("<II", crc, (megabytes << 20) % (1 << 32))


# --- Content-Encoding ---


def test_a_gzip_body_decompresses_to_what_the_backend_would_read():
    assert decompress(gzip.compress(RAW), "gzip", LIMIT) == RAW


def test_x_gzip_is_gzip():
    assert decompress(gzip.compress(RAW), "x-gzip", LIMIT) == RAW


@pytest.mark.parametrize("header", [None, "", "identity", "IDENTITY", " identity , identity ", ","])
def test_a_body_with_nothing_to_undo_is_returned_as_the_same_object(header):
    assert decompress(RAW, header, LIMIT) is RAW


def test_an_empty_body_is_returned_as_is_whatever_its_encoding():
    body = b""
    assert decompress(body, "gzip", LIMIT) is body


@pytest.mark.parametrize("header", ["GZIP", "Gzip", " gzip ", "\tgzip", "gzip, identity", "identity,gzip,"])
def test_the_header_is_read_without_regard_to_case_spaces_or_identity(header):
    assert decompress(gzip.compress(RAW), header, LIMIT) == RAW


def test_layered_encodings_are_undone_last_listed_first():
    body = gzip.compress(zlib.compress(RAW))  # deflate applied first, then gzip
    assert decompress(body, "deflate, gzip", LIMIT) == RAW
    with pytest.raises(UnsupportedEncoding):
        decompress(body, "gzip, deflate", LIMIT)


def test_a_gzip_of_a_gzip_is_undone_twice():
    assert decompress(gzip.compress(gzip.compress(RAW)), "gzip,gzip", LIMIT) == RAW


def test_more_than_the_maximum_layers_is_refused():
    body = RAW
    for _ in range(MAX_LAYERS + 1):
        body = gzip.compress(body)
    assert decompress(gzip.compress(RAW), ", ".join(["gzip"] * 1 + ["identity"] * 9), LIMIT) == RAW
    with pytest.raises(UnsupportedEncoding, match="too many Content-Encoding layers"):
        decompress(body, ", ".join(["gzip"] * (MAX_LAYERS + 1)), LIMIT)


def test_deflate_with_the_zlib_wrapper_decompresses():
    assert decompress(zlib.compress(RAW), "deflate", LIMIT) == RAW


def test_raw_deflate_without_the_zlib_wrapper_decompresses_too():
    assert decompress(raw_deflate(RAW), "Deflate", LIMIT) == RAW


def test_large_incompressible_bodies_come_through_whole():
    data = random.Random(0).randbytes(300_000)
    assert decompress(gzip.compress(data), "gzip", LIMIT) == data
    assert decompress(gzip.compress(data[:1000]) + gzip.compress(data[1000:]), "gzip", LIMIT) == data
    assert decompress(zlib.compress(data), "deflate", LIMIT) == data
    assert decompress(raw_deflate(data), "deflate", LIMIT) == data


def test_multi_member_gzip_is_decompressed_fully():
    body = gzip.compress(RAW[:10]) + gzip.compress(b"") + gzip.compress(RAW[10:])
    assert decompress(body, "gzip", LIMIT) == RAW


@pytest.mark.timeout(20)
def test_many_tiny_gzip_members_cost_time_linear_in_the_body():
    member = gzip.compress(b"")
    body = member * 100_000  # ~2 MB of empty members
    assert decompress(body, "gzip", LIMIT) == b""


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "x-compress", "chunked", "gzip;q=1"])
def test_an_unknown_content_encoding_is_refused_naming_it(coding):
    with pytest.raises(UnsupportedEncoding, match="unsupported Content-Encoding") as e:
        decompress(RAW, f"gzip, {coding.upper()}", LIMIT)
    assert coding in e.value.message
    assert e.value.reason == "unsupported_encoding"


def test_an_unknown_encoding_is_named_only_in_short_printable_ascii():
    with pytest.raises(UnsupportedEncoding) as e:
        decompress(RAW, "evil\r\nx-injected: 1" + "a" * 100 + "\u00e9", LIMIT)
    name = e.value.message.removeprefix("unsupported Content-Encoding: ")
    assert name == ("evilx-injected: 1" + "a" * 100)[:32]
    assert all(" " <= c <= "~" for c in e.value.message)
    assert "\n" not in e.value.message


def test_an_unprintable_encoding_is_refused_without_naming_it():
    with pytest.raises(UnsupportedEncoding, match=r"\(unprintable\)"):
        decompress(RAW, "\u00e9\u00e9", LIMIT)


@pytest.mark.timeout(20)
def test_a_gzip_bomb_stops_at_the_limit_without_producing_it_all():
    bomb = zeros_gzip(512)
    assert len(bomb) < 1 << 20
    with pytest.raises(BodyTooLarge, match=f"more than {LIMIT} bytes") as e:
        decompress(bomb, "gzip", LIMIT)
    assert e.value.reason == "too_large"


def test_the_bomb_is_a_valid_gzip_of_zeros():
    assert gzip.decompress(zeros_gzip(3)) == bytes(3 << 20)
    assert decompress(zeros_gzip(3), "gzip", 3 << 20) == bytes(3 << 20)


@pytest.mark.timeout(20)
def test_a_deflate_bomb_stops_at_the_limit():
    zeros = bytes(16 << 20)
    with pytest.raises(BodyTooLarge):
        decompress(zlib.compress(zeros, 9), "deflate", LIMIT)
    with pytest.raises(BodyTooLarge):
        decompress(raw_deflate(zeros), "deflate", LIMIT)


def test_a_body_of_exactly_the_limit_is_accepted_and_one_more_byte_is_not():
    data = b"x" * 1000
    assert decompress(gzip.compress(data), "gzip", 1000) == data
    with pytest.raises(BodyTooLarge):
        decompress(gzip.compress(data), "gzip", 999)


def test_the_limit_counts_every_gzip_member_together():
    body = gzip.compress(b"x" * 600) + gzip.compress(b"y" * 600)
    with pytest.raises(BodyTooLarge, match="more than 1000 bytes"):
        decompress(body, "gzip", 1000)


def test_the_limit_applies_to_every_layer():
    with pytest.raises(BodyTooLarge):
        decompress(gzip.compress(gzip.compress(bytes(5000))), "gzip, gzip", 1000)


def test_corrupt_gzip_is_refused():
    body = bytearray(gzip.compress(RAW))
    body[len(body) // 2] ^= 0xFF
    with pytest.raises(UnsupportedEncoding, match="is not valid gzip data"):
        decompress(bytes(body), "gzip", LIMIT)


def test_gzip_with_a_wrong_checksum_is_refused():
    body = bytearray(gzip.compress(RAW))
    body[-8] ^= 0x01  # CRC32 in the trailer
    with pytest.raises(UnsupportedEncoding, match="is not valid gzip data"):
        decompress(bytes(body), "gzip", LIMIT)


@pytest.mark.parametrize("cut", [1, 4, 8, 20])
def test_truncated_gzip_is_refused(cut):
    with pytest.raises(UnsupportedEncoding, match="is not valid gzip data"):
        decompress(gzip.compress(RAW)[:-cut], "gzip", LIMIT)


@pytest.mark.parametrize("trailer", [b"x", b"\x00\x00", b"\x1f", b"\x1f\x8b\x08", RAW])
def test_trailing_data_after_the_gzip_stream_is_refused(trailer):
    with pytest.raises(UnsupportedEncoding, match="is not valid gzip data"):
        decompress(gzip.compress(RAW) + trailer, "gzip", LIMIT)


def test_a_plain_body_labelled_gzip_is_refused_not_forwarded():
    with pytest.raises(UnsupportedEncoding, match="is not valid gzip data"):
        decompress(RAW, "gzip", LIMIT)


@pytest.mark.parametrize("body", [zlib.compress(RAW)[:-3], zlib.compress(RAW) + b"junk", RAW, b"\x78"])
def test_corrupt_truncated_or_trailing_deflate_is_refused(body):
    with pytest.raises(UnsupportedEncoding, match="is not valid deflate data"):
        decompress(body, "deflate", LIMIT)


def test_refusals_never_quote_the_body():
    secret = b"jane.doe@example.com"
    for body, header in [(secret, "gzip"), (secret, "deflate"), (gzip.compress(secret) + secret, "gzip")]:
        with pytest.raises(UnsupportedEncoding) as e:
            decompress(body, header, LIMIT)
        assert "jane" not in str(e.value)


# --- JSON text encodings ---


def test_a_plain_utf8_body_decodes_and_encodes_back_to_the_same_bytes():
    body = b'{"a":1}'
    decoded = decode_text(body)
    assert decoded == BodyText('{"a":1}', "utf-8", b"")
    assert decoded.encode(decoded.text) == body


def test_a_bom_utf8_body_decodes_without_the_bom_and_keeps_it_on_the_way_back():
    body = codecs.BOM_UTF8 + RAW
    decoded = decode_text(body)
    assert (decoded.text, decoded.encoding, decoded.bom) == (BODY, "utf-8", codecs.BOM_UTF8)
    assert decoded.encode(decoded.text) == body


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("with_bom", [True, False])
def test_utf16_and_utf32_bodies_round_trip_to_the_identical_bytes(encoding, with_bom):
    bom = _bom(encoding) if with_bom else b""
    body = bom + BODY.encode(encoding)
    decoded = decode_text(body)
    assert (decoded.text, decoded.encoding, decoded.bom) == (BODY, encoding, bom)
    assert decoded.encode(decoded.text) == body
    assert json.loads(body) == json.loads(BODY)  # what a Python backend reads from the same bytes


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_masked_text_goes_back_in_the_encoding_it_came_in(encoding):
    decoded = decode_text(_bom(encoding) + RAW.decode().encode(encoding))
    masked = decoded.text.replace("jane.doe@example.com", "[EMAIL]")
    assert decoded.encode(masked) == _bom(encoding) + masked.encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_text_whose_second_character_is_not_ascii_is_still_detected(encoding):
    text = '"中文 é"'  # in UTF-16 the first four bytes are 22 00 2D 4E (LE): only one zero byte
    decoded = decode_text(text.encode(encoding))
    assert (decoded.text, decoded.encoding) == (text, encoding)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_text_whose_first_character_is_not_ascii_is_read_by_its_bom(encoding):
    text = "中文 {}"
    decoded = decode_text(_bom(encoding) + text.encode(encoding))
    assert (decoded.text, decoded.encoding) == (text, encoding)


@pytest.mark.parametrize(
    "head",
    [
        b"{\x00\x00\x00",
        b"\x00\x00\x00{",
        b"{\x00\x22\x00",
        b"\x00{\x00\x22",
        b"\x22\x00\x2d\x4e",
        b"\x00\x22\x4e\x2d",
        b"\x00\x00\x20\x28",
        b"{}",
        b"{\x00",
        b"\x00{",
        b"1",
        b"12\x00",
        b'{"a"',
    ],
)
def test_detection_without_a_bom_agrees_with_pythons_json(head):
    expected = json.detect_encoding(head)
    assert detect_encoding(head) == (b"", expected)


def test_detection_checks_utf32_boms_before_utf16_ones():
    assert detect_encoding(codecs.BOM_UTF32_LE + "{}".encode("utf-32-le")) == (
        codecs.BOM_UTF32_LE,
        "utf-32-le",
    )
    assert detect_encoding(codecs.BOM_UTF16_LE + b"{\x00") == (codecs.BOM_UTF16_LE, "utf-16-le")


def test_invalid_utf8_names_the_byte():
    with pytest.raises(NotUtf8, match=r"^request body is not valid UTF-8 \(byte 5\)$") as e:
        decode_text(b'{"a":\xff}')
    assert e.value.reason == "not_utf8"


def test_invalid_utf8_after_a_bom_names_the_byte_in_the_whole_body():
    with pytest.raises(NotUtf8, match=r"^request body is not valid UTF-8 \(byte 8\)$"):
        decode_text(codecs.BOM_UTF8 + b'{"a":\xff}')


def test_utf16_of_odd_length_is_refused_naming_the_encoding_and_byte():
    body = '{"a":1}'.encode("utf-16-le") + b"\x00"  # 15 bytes
    with pytest.raises(NotUtf8, match=r"^request body is not valid UTF-16-LE \(byte 14\)$"):
        decode_text(body)


def test_a_lone_surrogate_in_utf16_bytes_is_refused():
    body = codecs.BOM_UTF16_BE + '{"a":"'.encode("utf-16-be") + b"\xd8\x00" + '"}'.encode("utf-16-be")
    with pytest.raises(NotUtf8, match=r"^request body is not valid UTF-16-BE \(byte 14\)$"):
        decode_text(body)


def test_utf32_out_of_range_is_refused():
    body = '{"a":"'.encode("utf-32-le") + (0x110000).to_bytes(4, "little") + '"}'.encode("utf-32-le")
    with pytest.raises(NotUtf8, match=r"^request body is not valid UTF-32-LE \(byte 24\)$"):
        decode_text(body)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_encoding_a_lone_surrogate_does_not_raise(encoding):
    decoded = decode_text(_bom(encoding) + "{}".encode(encoding))
    assert decoded.encode('{"a":"\ud800"}').startswith(_bom(encoding))


def test_the_text_is_kept_out_of_the_repr():
    assert "secret" not in repr(decode_text(b'{"secret":1}'))


def test_gzip_of_utf16_is_read_like_the_backend_reads_it():
    body = codecs.BOM_UTF16_LE + BODY.encode("utf-16-le")
    decoded = decode_text(decompress(gzip.compress(body), "gzip", LIMIT))
    assert decoded.text == BODY
    assert decoded.encode(decoded.text) == body


def _bom(encoding: str) -> bytes:
    return {
        "utf-8": codecs.BOM_UTF8,
        "utf-16-le": codecs.BOM_UTF16_LE,
        "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32-le": codecs.BOM_UTF32_LE,
        "utf-32-be": codecs.BOM_UTF32_BE,
    }[encoding]
