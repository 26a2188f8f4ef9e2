from pathlib import Path

import pytest

from pldistill_cli.config import load_params
from pldistill_cli.errors import PldistillError

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_with_their_sections():
    params = load_params(ROOT / "params.yaml")
    assert params.datasets == ("synthetic",)
    assert params.distill.lambda_p >= 0 and params.cache.top_k > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: [1, 2\n", "malformed YAML"),
        ("distill:\n  lamda_p: 1\n", "unknown setting `distill.lamda_p`"),
        ("distill:\n  epochs: many\n", "`distill.epochs` = 'many': input should be a valid integer"),
        ("distill:\n  device: tpu\n", "`distill.device` = 'tpu': input should be 'auto', 'cpu' or 'cuda'"),
        ("- a list\n", "expected a mapping"),
        ("", "holds no settings"),
        ("# seed: 7\n\n", "holds no settings"),
        ("distill:\n  epochs: 20\n  lr: 0.1\n  epochs: 1\n", "`distill.epochs` is set twice .lines 2 and 4."),
        ("folds: [1, 2, 1]\n", "`folds` lists 1 twice"),
    ],
)
def test_bad_params_name_the_problem(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(PldistillError, match=message.replace("[", r"\[").replace("`", "`")):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(PldistillError, match="not found"):
        load_params(tmp_path / "nope.yaml")
