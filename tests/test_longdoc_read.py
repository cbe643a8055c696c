"""Reading long documents from real files written here: txt, md, html, pdf (made with pypdf), and
a clear DocumentUnreadable for every file that cannot be read."""

from __future__ import annotations

import io
import os

import pytest

from ragspec.errors import DocumentUnreadable, RagspecError
from ragspec.longdoc.read import html_text, read_document


def make_pdf(pages: list[list[str]]) -> bytes:
    """A real PDF whose pages show `pages`' lines in Helvetica (an empty list: a page without text,
    as a scanned page looks to a text extractor)."""
    pypdf = pytest.importorskip("pypdf")
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = pypdf.PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"),
    }))
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        if not lines:
            continue
        ops = ["BT /F1 12 Tf 72 720 Td 14 TL", *(f"({line}) Tj T*" for line in lines), "ET"]
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        page[NameObject("/Contents")] = writer._add_object(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_text_and_markdown_are_read_as_written(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\r\nSecond line.   \n\n\n\nAfter a gap.\n", encoding="utf-8")
    (tmp_path / "b.md").write_bytes("\ufeff# Title\n\nSome *markdown* text, caf\u00e9.".encode("utf-8"))
    doc = read_document(tmp_path / "a.txt")
    assert doc.name == "a.txt"
    assert doc.text == "First line.\nSecond line.\n\nAfter a gap."
    assert read_document(tmp_path / "b.md").text == "# Title\n\nSome *markdown* text, caf\u00e9."


def test_checksum_follows_the_text_not_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("same text", encoding="utf-8")
    (tmp_path / "b.md").write_text("same text\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("other text", encoding="utf-8")
    a, b, c = (read_document(tmp_path / n) for n in ("a.txt", "b.md", "c.txt"))
    assert a.checksum == b.checksum != c.checksum


def test_html_keeps_the_visible_text_only(tmp_path):
    page = """<!doctype html><html><head><meta charset="utf-8"><title>The Report</title>
    <style>body { color: red }</style><script>var secret = "do not show";</script></head>
    <body><h1>Findings</h1><p>Revenue grew by <b>12%</b> &amp; costs fell.</p>
    <script>alert("hidden")</script><ul><li>One</li><li>Two</li></ul><br>End&nbsp;note</body></html>"""
    (tmp_path / "r.html").write_text(page, encoding="utf-8")
    text = read_document(tmp_path / "r.html").text
    assert text.splitlines() == ["The Report", "", "Findings", "", "Revenue grew by 12% & costs fell.",
                                 "", "One", "", "Two", "", "End\u00a0note"]
    assert "secret" not in text and "alert" not in text and "color" not in text


def test_html_declared_charset_is_honoured(tmp_path):
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>caf\u00e9</p></body></html>'
    (tmp_path / "l.htm").write_bytes(page.encode("iso-8859-1"))
    assert read_document(tmp_path / "l.htm").text == "caf\u00e9"
    assert html_text("<p>a</p><p>b</p>").split() == ["a", "b"]


def test_pdf_text_of_every_page(tmp_path):
    (tmp_path / "d.pdf").write_bytes(make_pdf([["The ship left at dawn.", "Nobody saw it."], ["Page two."]]))
    text = read_document(tmp_path / "d.pdf").text
    assert text.splitlines() == ["The ship left at dawn.", "Nobody saw it.", "", "Page two."]


def unreadable(path) -> str:
    with pytest.raises(DocumentUnreadable) as caught:
        read_document(path)
    assert isinstance(caught.value, RagspecError)  # the CLI prints it as one line
    return str(caught.value)


def test_missing_folder_and_unsupported_files(tmp_path):
    assert "document not found" in unreadable(tmp_path / "nope.txt")
    assert "is a folder" in unreadable(tmp_path)
    (tmp_path / "sheet.xlsx").write_bytes(b"PK\x03\x04")
    message = unreadable(tmp_path / "sheet.xlsx")
    assert "unsupported document type '.xlsx'" in message and ".pdf" in message
    (tmp_path / "README").write_text("text", encoding="utf-8")
    assert "(no extension)" in unreadable(tmp_path / "README")


def test_empty_and_blank_files(tmp_path):
    for name, content in (("e.txt", b""), ("w.md", b"  \n\t\n"), ("e.pdf", b"")):
        (tmp_path / name).write_bytes(content)
        assert "is empty" in unreadable(tmp_path / name)
    (tmp_path / "s.html").write_text("<html><script>only code</script></html>", encoding="utf-8")
    assert "holds no text" in unreadable(tmp_path / "s.html")


def test_undecodable_and_binary_text(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("iso-8859-1"))
    assert "is not utf-8-sig text" in unreadable(tmp_path / "latin.txt")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    assert "binary data" in unreadable(tmp_path / "bin.txt")


def test_damaged_and_image_only_pdfs(tmp_path):
    (tmp_path / "cut.pdf").write_bytes(make_pdf([["Some text."]])[:60])
    assert "is not a readable PDF" in unreadable(tmp_path / "cut.pdf")
    (tmp_path / "fake.pdf").write_text("not a pdf at all", encoding="utf-8")
    assert "is not a readable PDF" in unreadable(tmp_path / "fake.pdf")
    (tmp_path / "scan.pdf").write_bytes(make_pdf([[], []]))
    message = unreadable(tmp_path / "scan.pdf")
    assert "2 page(s) hold no text layer" in message and "OCR" in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions that bind")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("secret", encoding="utf-8")
    path.chmod(0)
    try:
        assert "cannot read" in unreadable(path)
    finally:
        path.chmod(0o600)
