from pathlib import Path

import pytest

from pldistill_cli.config import load_params
from pldistill_cli.errors import PldistillError

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load_with_their_sections():
    params = load_params(ROOT / "params.yaml")
    assert params.datasets == ("synthetic",)
    assert params.distill.weights["pl-distill"].lambda_p >= 0 and params.cache.top_k > 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: [1, 2\n", "malformed YAML"),
        ("distill:\n  lamda_p: 1\n", "unknown setting `distill.lamda_p`"),
        # the loss weights are per method, and a method has only the weights of its terms
        ("distill:\n  lambda_p: 0.5\n", "`distill.lambda_p` is set per method: `distill.weights.<method>.lambda_p` "
                                       ".methods using it: pdist, fitnets, cka, pl-distill."),
        ("distill:\n  weights:\n    kd: {lambda_p: 0.5}\n", "`distill.weights.kd.lambda_p`: kd has no term that "
                                                             "lambda_p weights"),
        ("distill:\n  weights:\n    fitnets: {cka_estimator: debiased}\n", "fitnets has no term that cka_estimator"),
        ("distill:\n  weights:\n    kdd: {}\n", "unknown setting `distill.weights.kdd`"),
        ("distill:\n  weights:\n    pdist: {lambda_p: -1}\n", "`distill.weights.pdist.lambda_p` = -1: input should be "
                                                              "greater than or equal to 0"),
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
