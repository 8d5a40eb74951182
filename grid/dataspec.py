"""A task's data, declared: where the rows are, how to read them, and what each gold field is.

The `data:` block of a task YAML (tasks/*.yaml) validates into `DataSpec`. The code holds formats
(grid.readers, grid.annotations); a new dataset is a new block, not a new loader. Sketch:

    data:
      files: {train: "some/train.part*.jsonl", test: "some/test.jsonl"}   # or {all: ...} + split
                                          # (and validation: ..., where the dataset has its own)
      read: {format: jsonl}               # jsonl json csv tsv parquet delimited lines
      hub: {path: org/name, splits: {train: train, test: test}}           # used without a data dir
      split: {partition: column}          # or {stratify: field, split_seed: 42, test_fraction: 0.2}
      id: id                              # a column; default "{split}-{index:05d}"
      text: utt
      fields:
        intent: {column: intent}
        slots: {column: annot_utt, annotation: bracket_slots}
        root: {column: label_text, transform: first_dotted_component}

Paths are relative to the data dir and may be globs: a glob's files are read in sorted order as
one split.

A dataset's own validation split (SNIPS's `valid/`, MASSIVE's `dev`) is declared beside train and
test (`files`, `hub.splits`, or a partition value); a search then holds out those rows instead of
carving them from train (workers/training.split_validation). Inference never reads it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SplitName = Literal["train", "validation", "test", "all"]
SPLIT_KEYS = ({"train", "test"}, {"train", "validation", "test"}, {"all"})
Transform = Literal["first_dotted_component"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReadSpec(_Strict):
    """How the files are parsed."""

    format: Literal["jsonl", "json", "csv", "tsv", "parquet", "delimited", "lines"]
    delimiter: str | None = Field(default=None, description="csv: ','; tsv: a tab; delimited: required")
    quoting: Literal["double", "none"] = Field(
        default="double", description="csv/tsv: `none` when texts hold quote characters as text (SST-2)")
    header: bool = Field(default=True, description="csv/tsv/delimited: the first line names the columns")
    column_names: tuple[str, ...] | None = Field(default=None, description="the columns when header is false")
    encoding: str = Field(default="utf-8", description="`utf-8-sig` drops a byte-order mark")
    free_column: str | None = Field(
        default=None,
        description="delimited: the one column whose text may hold the delimiter; the fields before it "
                    "split at the first delimiters, those after it at the last (FinCausal's `; `)")
    line_files: dict[str, str] | None = Field(
        default=None,
        description="lines: column -> file in each split's folder, one value per line (seq.in, seq.out, label)")

    @model_validator(mode="after")
    def _coherent(self) -> ReadSpec:
        if self.format == "delimited" and not self.delimiter:
            raise ValueError("format delimited needs a delimiter")
        if self.format == "lines" and not self.line_files:
            raise ValueError("format lines needs line_files")
        if not self.header and not self.column_names and self.format in ("csv", "tsv", "delimited"):
            raise ValueError("header: false needs column_names")
        return self


class HubSpec(_Strict):
    """The hub copy read when no data dir is given (an HF `datasets` id)."""

    path: str
    config: str | None = None
    splits: dict[SplitName, str] = Field(description="train/test (and validation), or all -> the hub's split name")
    rename: dict[str, str] = Field(default_factory=dict, description="hub column -> the column the fields read")
    index_column: str | None = Field(default=None,
                                     description="a column holding the row index (hub copies without ids)")


class PartitionSplit(_Strict):
    """Train and test (and validation, when given a value) are the rows whose `partition` column
    holds the split's value."""

    partition: str
    values: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=lambda: {"train": "train", "test": "test"})

    @field_validator("values")
    @classmethod
    def _train_and_test(cls, value: dict[str, str]) -> dict[str, str]:
        if not {"train", "test"} <= set(value):
            raise ValueError("give the values of train and test (validation is optional)")
        if len(set(value.values())) < len(value):
            raise ValueError("each split needs its own value")
        return value


class FractionSplit(_Strict):
    """A seeded split that keeps each label's share: per label (sorted), shuffle, the first
    round(n * test_fraction) rows are test. Row order within each split is the source's."""

    stratify: str = Field(description="the gold field whose labels are kept in proportion")
    split_seed: int
    test_fraction: float = Field(gt=0, lt=1)


class FieldSpec(_Strict):
    """One gold field of the normalized rows."""

    column: str | None = None
    references: tuple[str, ...] | None = Field(
        default=None, description="text gold with several references: the columns present in a split, in order")
    names: tuple[str, ...] | None = Field(default=None, description="an integer column's value i is names[i]")
    transform: Transform | None = None
    pattern: str | None = Field(default=None, description="a regex; the gold is its first group (or the match)")
    annotation: Literal["bracket_slots", "bio", "tags"] | None = Field(
        default=None, description="word-level gold: see grid.annotations")
    outside: str = Field(default="O", description="annotation tags: the value meaning no slot")

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        if (self.column is None) == (self.references is None):
            raise ValueError("give exactly one of column and references")
        return self

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regex: {exc}") from None
        return value


class DataSpec(_Strict):
    """Everything needed to build a task's normalized rows (example_id, text, words, gold fields)."""

    files: dict[SplitName, str | tuple[str, ...]] | None = Field(
        default=None, description="split -> path or glob (or a list of them) under the data dir")
    read: ReadSpec | None = None
    hub: HubSpec | None = None
    split: PartitionSplit | FractionSplit | None = Field(
        default=None, description="how train and test come out of a source's `all` rows")
    id: str | None = Field(default=None, description="the id column; default: id_template")
    id_template: str = Field(default="{split}-{index:05d}", description="ids from the split and the row index")
    text: str = Field(description="the input text column")
    fields: dict[str, FieldSpec]
    drop_empty_text: bool = Field(default=False, description="drop rows whose text is empty or blank")

    @field_validator("id_template")
    @classmethod
    def _formats(cls, value: str) -> str:
        try:
            value.format(split="train", index=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"may use only {{split}} and {{index}}: {exc!r}") from None
        return value

    @model_validator(mode="after")
    def _coherent(self) -> DataSpec:
        if self.files is None and self.hub is None:
            raise ValueError("give files (with read) or hub")
        if self.files is not None and self.read is None:
            raise ValueError("files need read: {format: ...}")
        for where, splits in (("files", self.files), ("hub.splits", self.hub and self.hub.splits)):
            if not splits:
                continue
            keys = set(splits)
            if keys not in SPLIT_KEYS:
                raise ValueError(f"{where}: give train and test (and validation, if the dataset has one), or all")
            if keys == {"all"} and self.split is None:
                raise ValueError(f"{where}: all rows in one source need split: (partition or stratify)")
        if isinstance(self.split, FractionSplit) and self.split.stratify not in self.fields:
            raise ValueError(f"split.stratify: {self.split.stratify!r} is not one of fields")
        declared = {where: "validation" in splits for where, splits in
                    (("files", self.files), ("hub.splits", self.hub and self.hub.splits))
                    if splits and "all" not in splits}
        if len(set(declared.values())) > 1:
            raise ValueError("files and hub.splits must agree on a validation split (both or neither)")
        return self

    @property
    def has_validation(self) -> bool:
        """The dataset declares its own validation split."""
        sources = [self.files, self.hub.splits if self.hub else None]
        if any(s and "validation" in s for s in sources):
            return True
        return isinstance(self.split, PartitionSplit) and "validation" in self.split.values
