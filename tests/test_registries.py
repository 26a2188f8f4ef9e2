"""One list of corpus and adapter names: the registry (datasets/) and adapter_names.py agree, the CLI and the
settings take their choices from them, and no other module writes the names out again."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from pldistill_cli.adapter_names import ADAPTER_NAMES
from pldistill_cli.cli import app
from pldistill_cli.config import AdapterName, CorpusParams, Params
from pldistill_cli.datasets import ADAPTERS, CORPORA
from pldistill_cli.errors import PldistillError
from pldistill_cli.graph import STAGES, code_deps

PACKAGE = Path(__file__).resolve().parents[1] / "pldistill_cli"


def name_lists(source: str, names: tuple[str, ...], least: int = 3) -> list[int]:
    """Lines of the literal tuples, lists, sets, dict keys and Literal[...] that hold `least` or more of `names`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [k for k in node.keys if k is not None]
        else:
            continue
        words = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        if len(words & set(names)) >= least:
            found.append(node.lineno)
    return sorted(found)


def test_the_scan_finds_a_second_list():
    source = 'A = Literal["synthetic", "ravdess", "folder"]\nB = {"ravdess": 1, "savee": 2, "iemocap": 3}\nC = ("ravdess", "x")\n'
    assert name_lists(source, ADAPTER_NAMES) == [1, 2]


def test_no_module_writes_the_names_out_again():
    found = {str(path.relative_to(PACKAGE)): lines for path in sorted(PACKAGE.rglob("*.py"))
             if (lines := name_lists(path.read_text(), ADAPTER_NAMES))}
    assert found == {"adapter_names.py": [6]}


def test_the_registry_the_settings_and_the_cli_agree():
    assert tuple(ADAPTERS) == ADAPTER_NAMES
    assert set(CORPORA) <= set(ADAPTERS) and all(ADAPTERS[name] is c.adapter for name, c in CORPORA.items())
    assert all(a.name == name for name, a in ADAPTERS.items()) and all(c.name == n for n, c in CORPORA.items())
    assert get_args(AdapterName) == ("", *ADAPTER_NAMES)
    shown = CliRunner().invoke(app, ["preprocess", "--help"], env={"COLUMNS": "300"}).output
    assert f"<{'|'.join(ADAPTER_NAMES)}>" in shown


def test_a_corpus_module_declares_everything_about_its_corpus():
    for corpus in CORPORA.values():
        assert len(set(corpus.labels)) == len(corpus.labels) >= 2 and corpus.licence and corpus.description
        assert corpus.hub_licence and (corpus.headline is None or corpus.headline[0] in ("WA", "UA"))


def test_the_tokenizer_label_sets_are_corpora_label_sets():
    from pldistill_cli.models import TOKENIZER_LABEL_SETS

    assert set(TOKENIZER_LABEL_SETS) <= {c.labels for c in CORPORA.values()}


def test_only_the_stages_that_read_a_corpus_depend_on_its_parser():
    """Editing a corpus's parser re-runs preprocess and report only: pretraining imports the generator
    (synthesis.py), not the corpus registry."""
    reading = {name for name, stage in STAGES.items() if any("/datasets/" in f for f in code_deps(stage))}
    assert reading == {"preprocess", "report"}
    assert "pldistill_cli/synthesis.py" in code_deps(STAGES["pretrain-encoder"])


def test_the_settings_only_some_formats_read_are_declared_by_them():
    from pldistill_cli.datasets import READ_BY, resolve

    assert READ_BY == {"csv": ("folder",), "metadata": ("emobox",), "speaker_pattern": ("emobox", "folder")}
    params = Params(corpora={"mine": CorpusParams(adapter="savee", speaker_pattern="x")})
    with pytest.raises(PldistillError, match=r"corpora\.mine\.speaker_pattern is set, but the savee adapter does not "
                                             r"read it; remove it, or set corpora\.mine\.adapter to emobox or folder$"):
        resolve("mine", params)
