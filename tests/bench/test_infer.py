"""`convstack bench infer`: a very short run on the tiny model keeps every interleaved round with
its load and CPU figures, summarizes every variant at both batch sizes against the SavedModel,
and measures accuracies that agree with the model; bad input is one line and exit 2. No timing
is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convstack.bench.infer import REFERENCE, VARIANTS, bench_main
from tests.serving.helpers import MODEL_NAME, make_model_dir
from tests.trainer import export_helpers

pytestmark = pytest.mark.slow

ROUNDS = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-infer")
    make_model_dir(root / "models", versions=(1,))
    images, labels = export_helpers.held_out_data()
    train, train_labels = export_helpers.synthetic_data(64, seed=3)
    data = root / "tiny.npz"
    np.savez(data, x_train=train, y_train=train_labels, x_test=images, y_test=labels)
    out = root / "infer.json"
    argv = [
        "--model-base", str(root / "models"), "--model-name", MODEL_NAME,
        "--data", f"npz:{data}", "--rounds", str(ROUNDS), "--seconds", "0.01",
        "--pool-size", "2", "--out", str(out),
    ]  # fmt: skip
    assert bench_main(argv) == 0
    return json.loads(out.read_text()), out


def test_every_round_of_every_variant_is_kept_with_its_load_and_cpu(report):
    document, _ = report
    records = document["rounds"]
    assert len(records) == len(VARIANTS) * 2 * ROUNDS
    assert {r["variant"] for r in records} == {f"{v}@b{b}" for v in VARIANTS for b in (1, 32)}
    for record in records:
        assert len(record["load_average"]) == 3
        assert record["cpu_seconds"]["own"] > 0
        figures = record["figures"]
        assert figures["calls"] >= 3
        assert figures["p99_ms"] >= figures["p50_ms"] > 0
        assert figures["images_per_second"] > 0
    # Interleaved: each round measures every variant once, the order rotated.
    first, second = ([r["variant"] for r in records if r["round"] == i] for i in range(2))
    assert sorted(first) == sorted(second) and first != second


def test_results_summarize_both_batches_against_the_saved_model(report):
    document, out = report
    results = {(r["variant"], r["batch"]): r for r in document["results"]}
    assert set(results) == {(v, b) for v in VARIANTS for b in (1, 32)}
    for (variant, _), entry in results.items():
        for figure in ("p50_ms", "p99_ms", "images_per_second"):
            spread = entry[figure]
            assert spread["n"] == ROUNDS
            assert spread["min"] <= spread["median"] <= spread["max"]
        ratio = entry["images_per_second_ratio"]
        assert ratio["per_round"]["n"] == ROUNDS
        if variant == REFERENCE:
            assert ratio["of_medians"] == pytest.approx(1.0)
    assert document["goal"]["best"] in VARIANTS
    assert document["machine"]["cpus"] >= 1 and len(document["machine"]["load_average"]) == 3
    assert out.with_suffix(".png").stat().st_size > 0


def test_accuracies_agree_with_the_model(report):
    document, _ = report
    images, labels = export_helpers.held_out_data()
    expected = export_helpers.trained_model()(images, training=False).numpy().argmax(-1)
    variants = document["variants"]
    assert set(variants) == set(VARIANTS)
    assert variants[REFERENCE]["accuracy"] == float(np.mean(expected == labels))
    # Float paths of the same weights classify alike on this easy data; int8 nearly.
    floats = [name for name in VARIANTS if "int8" not in name]
    for name in floats:
        assert variants[name]["class_agreement"] == 1.0, name
    for name in ("tflite_int8", "tflite_int8_pool"):
        assert variants[name]["class_agreement"] >= 0.9
        assert abs(variants[name]["accuracy"] - variants[REFERENCE]["accuracy"]) <= 0.1


def test_missing_version_and_unknown_variant_are_one_line_exit_2(tmp_path, capsys):
    assert bench_main(["--model-base", str(tmp_path), "--model-name", "none"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no exported version under" in error[0]
    make_model_dir(tmp_path / "models", versions=(1,))
    argv = ["--model-base", str(tmp_path / "models"), "--model-name", MODEL_NAME]
    assert bench_main([*argv, "--variants", "tflite_int4"]) == 2
    assert "--variants: unknown tflite_int4" in capsys.readouterr().err
