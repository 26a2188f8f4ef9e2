"""Where every stage reads and writes: the pipeline's file layout, defined once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


REPORT_FILES = ("report.md", "report.html", "training_curves.csv", "predictions.csv", "figures")  # what the report stage owns in report/


def student_name(method: str, seed: int | str) -> str:
    """A student run: one method trained with one seed (also its metrics name; graph.py's template)."""
    return f"student-{method}-s{seed}"


@dataclass(frozen=True)
class Layout:
    data: Path = Path("data")
    metrics_root: Path = Path("metrics")
    report_root: Path = Path("report")

    def raw(self, dataset: str) -> Path:
        """Sources that the pipeline makes itself (the synthetic corpus)."""
        return self.data / "raw" / dataset

    def encoder(self) -> Path:
        """The pretrained audio encoder that every teacher of a preset built from configs starts from."""
        return self.data / "encoder"

    def teacher_init(self) -> Path:
        """The pretrained teacher (pretrain-teacher) that every fold's teacher of a preset built from configs starts from."""
        return self.data / "teacher-init"

    def prepared(self, dataset: str) -> Path:
        return self.data / "prepared" / dataset

    def manifest(self, dataset: str) -> Path:
        return self.prepared(dataset) / "manifest.parquet"

    def run(self, dataset: str, fold: int) -> Path:
        return self.data / "runs" / dataset / f"fold{fold}"

    def teacher(self, dataset: str, fold: int) -> Path:
        return self.run(dataset, fold) / "teacher"

    def cache(self, dataset: str, fold: int) -> Path:
        return self.run(dataset, fold) / "cache"

    def student(self, dataset: str, fold: int, name: str) -> Path:
        return self.run(dataset, fold) / name

    def encoded(self, dataset: str, key: str) -> Path:
        """The corpus's encoder outputs under one encoder and preprocessing (`key`): shared by its folds."""
        return self.data / "encoded" / dataset / key

    def work(self, dataset: str | None, fold: int | None, stage: str) -> Path:
        """Resumable state of a stage (of the pipeline, a dataset, or one of its folds); no stage declares
        it, so DVC never deletes it."""
        return self.data / "work" / (dataset or "") / (f"fold{fold}" if fold is not None else "") / stage

    def metrics(self, dataset: str, fold: int, model: str) -> Path:
        return self.metrics_root / dataset / f"fold{fold}" / f"{model}.json"

    def details(self, dataset: str, fold: int, model: str) -> Path:
        return self.metrics_root / dataset / f"fold{fold}" / f"{model}-details.json"

    def latency(self, dataset: str, fold: int, model: str) -> Path:
        return self.metrics_root / dataset / f"fold{fold}" / f"{model}-latency.json"

    def attention_examples(self, dataset: str, fold: int) -> Path:
        return self.metrics_root / dataset / f"fold{fold}" / "teacher-attention.json"

    def predictions(self, dataset: str, fold: int, model: str) -> Path:
        return self.metrics_root / dataset / f"fold{fold}" / f"{model}-predictions.csv"
