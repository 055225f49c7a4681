"""shown(): caller-controlled text becomes printable, bounded and unambiguous before it is logged."""

from __future__ import annotations

from spice_stream_common.untrusted import printable, shown


def test_control_characters_and_escape_sequences_are_escaped():
    text = "/tmp/x\nspice-streamd[1]: INFO session registered: uid 0\x1b[2K\x1b]0;t\x07\r\t\x7f"
    out = shown(text)
    assert out.isprintable()
    assert out == ('"/tmp/x\\nspice-streamd[1]: INFO session registered: uid 0\\x1b[2K\\x1b]0;t'
                   '\\x07\\r\\t\\x7f"')


def test_unicode_that_hides_or_reorders_text_is_escaped_but_letters_stay():
    assert shown("jos\u00e9\u202e\u2028\u200b") == '"jos\u00e9\\u202e\\u2028\\u200b"'
    assert shown(b"a\xffb") == '"a\\xffb"'  # not UTF-8: the byte, not a replacement character


def test_quotes_and_backslashes_cannot_fake_the_end_of_the_text():
    assert shown('a" registered "b\\') == '"a\\" registered \\"b\\\\"'


def test_long_text_is_cut_with_an_ellipsis():
    assert shown("x" * 500, 10) == '"' + "x" * 10 + '"…'
    assert shown("x" * 10, 10) == '"' + "x" * 10 + '"'
    assert shown("a\nb", quoted=False) == "a\\nb"


def test_printable_leaves_composed_messages_alone_and_guards_the_rest():
    path = "/a\nb"
    composed = f"the Xauthority file {shown(path)} does not exist"
    assert printable(composed) == composed
    assert printable("a\x1bb") == "a\\x1bb"
