"""Shared fixtures: a tiny teacher and a few real synthetic clips, made once per test session."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from pldistill_cli.config import (CacheParams, CorpusParams, DistillParams, Params, PretrainEncoderParams,
                                  PretrainTeacherParams, TrainTeacherParams)
from pldistill_cli.layout import Layout

torch.set_num_threads(1)


def small_params(**overrides) -> Params:
    """A 48-clip synthetic corpus (6 speakers, 3 folds, 1 sentence), a random encoder and teacher start, one-epoch training."""
    params = Params(
        corpora={"synthetic": CorpusParams(adapter="synthetic", n_speakers=6, n_sentences=1, n_folds=3)},
        pretrain_encoder=PretrainEncoderParams(clips=0),
        pretrain_teacher=PretrainTeacherParams(voices=0),
        train_teacher=TrainTeacherParams(epochs=1, batch_size=8),
        cache=CacheParams(batch_size=8, top_k=4),
        distill=DistillParams(epochs=1, batch_size=8),
    )
    return dataclasses.replace(params, **overrides)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> tuple[Params, Layout]:
    """The small synthetic corpus, preprocessed once (espeak-ng, offline), and its (random) encoder's and teacher's records."""
    from pldistill_cli.preprocess import preprocess
    from pldistill_cli.pretrain_encoder import pretrain_encoder
    from pldistill_cli.pretrain_teacher import pretrain_teacher

    root = tmp_path_factory.mktemp("pipeline")
    layout = Layout(data=root / "data", metrics_root=root / "metrics", report_root=root / "report")
    params = small_params()
    preprocess("synthetic", params, layout)
    pretrain_encoder(params, layout)
    pretrain_teacher(params, layout)
    return params, layout


@pytest.fixture(scope="session")
def layout_beside(prepared, tmp_path_factory):
    """A layout of a test's own whose named data folders are the prepared fixture's (symlinks): a test remakes
    one stage's output there without changing the shared ones."""
    def make(*shared: str) -> Layout:
        layout = dataclasses.replace(prepared[1], data=tmp_path_factory.mktemp("beside") / "data")
        layout.data.mkdir()
        for name in shared:
            (layout.data / name).symlink_to(prepared[1].data / name)
        return layout
    return make


@pytest.fixture(scope="session")
def tiny_teacher():
    from pldistill_cli.models import build_teacher, get_preset

    model, processor = build_teacher(get_preset("tiny"), seed=0)
    return model.eval(), processor


def pytest_collection_modifyitems(items):
    """Under mutmut (scripts/mutation.sh; it sets MUTANT_UNDER_TEST and stops at the first failure), the
    torchrun tests run last, so that a mutant a fast test kills never waits for them."""
    if "MUTANT_UNDER_TEST" in os.environ:
        items.sort(key=lambda item: item.nodeid.startswith("tests/test_distributed.py"))
