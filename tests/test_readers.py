"""File formats on files written here: what real files need (no header, no quoting, a BOM, a
delimiter inside a text), and one-line errors naming file and line."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grid.dataspec import ReadSpec
from grid.errors import GridError
from grid.readers import read_files


def rows(path, **spec) -> list[dict]:
    return read_files([path], ReadSpec(**spec)).rows.to_list()


def test_csv_without_header_takes_the_declared_names(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('"it\'s, fine",1\nNA,0\n')
    assert rows(path, format="csv", header=False, column_names=("text", "label")) == [
        {"text": "it's, fine", "label": 1}, {"text": "NA", "label": 0}]  # "NA" is text, not missing


def test_tsv_without_quoting_keeps_quote_characters(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text('sentence\tlabel\n"a quoted start and an "inner" one \t1\n')
    assert rows(path, format="tsv", quoting="none") == [
        {"sentence": '"a quoted start and an "inner" one ', "label": 1}]


def test_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x y"], "label": ["b"]}), path)
    assert rows(path, format="parquet") == [{"text": "x y", "label": "b"}]


def test_latin1_delimited_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("Caf\xe9 sales rose@positive\n".encode("latin-1"))
    assert rows(path, format="delimited", delimiter="@", header=False, column_names=("sentence", "label"),
                encoding="latin-1") == [{"sentence": "Café sales rose", "label": "positive"}]


def test_delimited_wrong_field_count_names_the_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("Index; Text; Gold\n1; ok; 0\n2; no label\n")
    with pytest.raises(GridError, match=r"a.csv:3: 2 fields, expected 3"):
        rows(path, format="delimited", delimiter="; ")


def test_line_files_of_different_lengths(tmp_path):
    (tmp_path / "seq.in").write_text("a b\nc\n")
    (tmp_path / "label").write_text("x\n")
    with pytest.raises(GridError, match=r"line files differ in length: seq.in 2 lines, label 1 lines"):
        rows(tmp_path, format="lines", line_files={"text": "seq.in", "intent": "label"})


def test_a_format_needs_its_options():
    with pytest.raises(ValueError, match="delimited needs a delimiter"):
        ReadSpec(format="delimited")
