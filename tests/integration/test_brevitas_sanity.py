"""The seeds' sanity rule and the point of good PTQ, for the Brevitas backend on the demo
detector (COCO mAP50-95 with pycocotools through ONNX Runtime, the demo study's 100
evaluation images and 32 calibration images):

- uniform W8A8 with the default options loses at most 1.0 point (if W8 collapses, the
  pipeline is wrong, not the bit width);
- uniform W4A16 with the better PTQ options loses clearly less than naive max-scaled
  W4A16: MSE 4-bit scales + bias correction with round-to-nearest less, and with GPTQ
  (sequential, ``gptq: true``, or the cached float-input GPTQ of the default) at most a
  quarter of it, and the default at most 2 points. (On the final demo model: naive -0.231,
  nearest -0.201, sequential GPTQ -0.019, default -0.014; most of the naive loss is the RGB
  input conv, which only an output-aware method like GPTQ repairs: see docs/benchmarks.md.)

Several minutes on a 2-core CPU (13 min with the development machine loaded; GPTQ is most of
it): marked ``slow``; the full table
is in docs/benchmarks.md, "Brevitas backend" (``benchmarks/bench_brevitas.py``).
"""

from __future__ import annotations

import pytest
from quantizer_helpers import sanity_evaluation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluation(demo_spec, demo_model, demo_subset, tmp_path_factory):
    return sanity_evaluation(demo_spec, demo_model, demo_subset, tmp_path_factory.mktemp("brevitas-sanity"))


def _map(demo_model, evaluation, precision: str, **options) -> float:
    from mpq.assignment import Assignment
    from quantizers.brevitas_backend import BrevitasBackend
    from quantizers.brevitas_options import BrevitasOptions

    coco, calib, _, out = evaluation
    backend = BrevitasBackend(options=BrevitasOptions(**options))
    qmodel = backend.materialize(demo_model, Assignment.uniform(demo_model.quantizable_layers, precision), calib)
    tag = "-".join(f"{k}={v}" for k, v in options.items()) or "default"
    return coco.evaluate(backend.export(qmodel, out / f"{precision}-{tag}.onnx").path).map50_95


def test_w8a8_loses_at_most_one_point(demo_model, evaluation):
    float_map = evaluation[2]
    q_map = _map(demo_model, evaluation, "W8A8")
    assert q_map >= float_map - 0.010, f"W8A8 mAP50-95 {q_map:.4f} vs float {float_map:.4f}"


def test_good_ptq_loses_clearly_less_at_w4_than_naive_ptq(demo_model, evaluation):
    float_map = evaluation[2]
    naive = _map(demo_model, evaluation, "W4A16", weight_scale="max", act_calibration="max", bias_correction=False,
                 weight_rounding="nearest")
    nearest = _map(demo_model, evaluation, "W4A16", weight_rounding="nearest")
    default = _map(demo_model, evaluation, "W4A16")
    gptq = _map(demo_model, evaluation, "W4A16", gptq=True)
    assert float_map - naive > 0.005, "naive W4 should lose something measurable on the demo model"
    msg = (f"W4A16: naive {naive:.4f}, MSE scales + nearest {nearest:.4f}, default (cached GPTQ) {default:.4f}, "
           f"sequential gptq {gptq:.4f} (float {float_map:.4f})")
    assert nearest > naive, msg
    assert float_map - gptq <= 0.25 * (float_map - naive), msg
    # issue 13: the default (cached float-input GPTQ) is as good as sequential GPTQ, and within 2 points
    assert float_map - default <= 0.25 * (float_map - naive), msg
    assert float_map - default <= 0.020, msg
