"""CKA (issue 20): the paper's invariances on random data, minibatch ~ full CKA, and `medtricks cka` (also on a
card with other classes)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medtricks.cli import main
from medtricks.evaluate.cka import MinibatchCKA, linear_cka, minibatch_cka, unbiased_hsic
from medtricks.recipe import load_recipe


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    y = x @ torch.randn(30, 20, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        200, 20, generator=g, dtype=torch.float64
    )
    return x, y


def test_identical_representations_give_one(xy):
    x, _ = xy
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert minibatch_cka(x, x, batch_size=50) == pytest.approx(1.0)


def test_symmetric(xy):
    x, y = xy
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x))
    assert minibatch_cka(x, y, 50) == pytest.approx(minibatch_cka(y, x, 50))
    assert 0.0 < linear_cka(x, y) < 1.0


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(xy):
    x, y = xy
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    ref = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(ref, rel=1e-9)
    assert linear_cka(7.5 * x, y) == pytest.approx(ref, rel=1e-9)
    assert linear_cka(x, 0.01 * y) == pytest.approx(ref, rel=1e-9)
    mref = minibatch_cka(x, y, 50)
    assert minibatch_cka(x @ q, 3 * y, 50) == pytest.approx(mref, rel=1e-9)


def test_not_invariant_to_arbitrary_invertible_linear_transforms(xy):
    x, y = xy
    # an invertible but badly conditioned map: stretches one direction 1000x
    a = torch.eye(30, dtype=torch.float64)
    a[0, 0] = 1000.0
    a[1, 0] = 3.0
    assert torch.linalg.matrix_rank(a) == 30
    assert abs(linear_cka(x @ a, y) - linear_cka(x, y)) > 0.05


def test_feature_form_equals_gram_form():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 50, generator=g), torch.randn(20, 8, generator=g)  # 50 features > 20 images: Gram form
    xs, ys = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    expected = float((ys.T @ xs).norm() ** 2 / ((xs.T @ xs).norm() * (ys.T @ ys).norm()))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-9)


def test_minibatch_cka_approaches_full_cka_on_large_n():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 10, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :6] @ torch.randn(6, 12, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        4000, 12, generator=g, dtype=torch.float64
    )
    assert minibatch_cka(x, y, batch_size=200) == pytest.approx(linear_cka(x, y), abs=0.02)


def test_unbiased_hsic_matches_the_formula():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    k, l_ = x @ x.T, y @ y.T
    kt, lt = k.clone().fill_diagonal_(0), l_.clone().fill_diagonal_(0)
    n, one = 9, torch.ones(9, 1, dtype=torch.float64)
    expected = (
        torch.trace(kt @ lt)
        + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one.T @ kt @ lt @ one)
    ) / (n * (n - 3))
    assert float(unbiased_hsic(k, l_)) == pytest.approx(float(expected), rel=1e-12)


def test_accumulator_matrix_over_layers(xy):
    x, y = xy
    acc = MinibatchCKA(2, 2)
    for s in range(0, 200, 50):
        acc.update([x[s : s + 50], y[s : s + 50]], [y[s : s + 50], x[s : s + 50]])
    m = acc.compute()
    assert m.shape == (2, 2) and m[0, 1] == pytest.approx(1.0) and m[1, 0] == pytest.approx(1.0)
    assert m[0, 0] == pytest.approx(m[1, 1])


def test_hooks_on_vit_blocks_default_layers():
    import timm

    from medtricks.posthoc.representations import capture_cka, default_layers

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, init_values=1e-5, num_classes=2
    ).eval()
    assert default_layers(model) == ["blocks.0", "blocks.1", "blocks.2"]
    data = [(torch.rand(8, 3, 32, 32), torch.zeros(8)) for _ in range(2)]
    m = capture_cka(model, model, data, data, default_layers(model), default_layers(model))
    assert np.allclose(np.diag(m), 1.0)
    lin = capture_cka(model, model, data, data, ["blocks.0"], ["blocks.2"], method="linear")
    assert lin.shape == (1, 1) and 0 < lin[0, 0] <= 1


# --------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, finished_one_epoch_overrides):

    from medtricks.run import run_recipe

    root = Path(__file__).resolve().parents[2]
    tmp = tmp_path_factory.mktemp("cka")
    recipe = load_recipe(
        root / "recipes" / "quickstart.yaml",
        overrides=[
            *finished_one_epoch_overrides,
            f"data.root={tmp / 'phantoms'}",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    return result, tmp


@pytest.mark.slow
def test_cka_command_same_run_and_vs_init(finished_run, capsys):
    from medtricks.cli import main
    from medtricks.tracking import create_store

    result, tmp = finished_run
    run = str(result.run_dir)
    out = tmp / "cka_out"
    assert (
        main(
            [
                "cka",
                run,
                run,
                "--card",
                "synthetic-phantoms",
                "--root",
                str(tmp / "phantoms"),
                "--n",
                "40",
                "--batch-size",
                "20",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "layer4.1" in text and "40 images" in text
    saved = json.loads((out / "cka.json").read_text())
    assert saved["layers_a"][0] == "layer1.0" and len(saved["layers_a"]) == 8
    assert all(v == pytest.approx(1.0) for v in saved["diagonal"])
    assert (out / "cka.png").stat().st_size > 1000

    assert main(["cka", run, "--vs-init", "--n", "12", "--batch-size", "6", "--out", str(out), "--log"]) == 0
    text = capsys.readouterr().out
    assert "moved most by fine-tuning" in text and "logged to" in text
    saved = json.loads((out / "cka_vs_init.json").read_text())
    assert saved["vs_init"] and all(v is None or v < 1.0 - 1e-9 for v in saved["diagonal"])  # training moved them
    record = create_store("none", root=tmp / "runs").get_run(result.run_id)
    assert "cka_init/mean" in record.metrics

    assert main(["cka", run]) == 2  # neither RUN_B nor --vs-init
    assert "--vs-init" in capsys.readouterr().err


@pytest.mark.slow
def test_cka_reads_a_card_with_other_classes_without_a_class_map(untracked_binary_run, tmp_path, capsys):
    from medtricks.data import synthesize_phantoms

    result, tmp, _ = untracked_binary_run
    synthesize_phantoms(tmp_path / "three", n=12, size=32, seed=3)  # normal / bacterial / covid
    assert (
        main(
            [
                "cka",
                str(result.run_dir),
                "--vs-init",
                "--card",
                "synthetic-phantoms",
                "--root",
                str(tmp_path / "three"),
                "--n",
                "8",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "cka"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (tmp_path / "cka" / "cka_vs_init.json").is_file()
