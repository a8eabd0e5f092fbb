"""benchmarks/output_encoding.py on a small picture: every encoder and decoder gets a row, and each
PNG codec is checked lossless by the benchmark itself (it raises otherwise)."""

from __future__ import annotations

import json

from benchmarks import output_encoding


def test_every_codec_gets_a_row(tmp_path):
    assert output_encoding.main(["--sizes", "96x64", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "output_encoding.json").read_text())
    pictures = {row["picture"] for row in report["rows"]}
    assert {(row["picture"], row["encoder"]) for row in report["rows"]} == {
        (picture, encoder) for picture in pictures for encoder in output_encoding.encoders()
    }
    assert {(row["picture"], row["decoder"]) for row in report["decode_rows"]} == {
        (picture, decoder) for picture in pictures for decoder in output_encoding.decoders()
    }
    assert all(row["lossless"] for row in report["rows"] if row["lossless"] is not None)
    assert "Input PNGs" in (tmp_path / "output_encoding.md").read_text()
