"""quantizers/rounding.py and quantizers/weight_store.py on small layers: input moments,
GPTQ/GPFQ/nearest integers, the store on disk (digest-checked)."""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from quantizers.rounding import (  # noqa: E402
    collect_hessians,
    gpfq_integers,
    gptq_integers,
    nearest_integers,
    output_error,
    plan_passes,
    prepare,
    round_weights,
    unfold_input,
)
from quantizers.weight_store import DamagedStore, RoundedWeight, WeightCache, WeightStore, store_key  # noqa: E402


def _correlated_input(n: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) * 0.3 + torch.eye(c)
    return torch.randn(n, c, generator=g) @ mix


def _layer_problem(rows: int = 16, cols: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = _correlated_input(512, cols, seed)  # (samples, columns)
    H = (2 / x.shape[0]) * (x.t() @ x)
    w = torch.randn(rows, cols, generator=g)
    scale = w.abs().amax(1, keepdim=True) / 7
    return w, H.unsqueeze(0), scale, x


def test_nearest_is_plain_rounding():
    w, _, scale, _ = _layer_problem()
    q = nearest_integers(w, scale, -7, 7)
    assert torch.equal(q, torch.clamp(torch.round(w / scale), -7, 7))
    assert q.abs().max() <= 7


@pytest.mark.parametrize("fn", [gptq_integers, gpfq_integers])
def test_output_aware_rounding_beats_nearest_on_the_output(fn):
    for seed in range(3):
        w, H, scale, _ = _layer_problem(seed=seed)
        q = fn(w, H, scale, -7, 7)
        assert q.shape == w.shape and q.abs().max() <= 7 and torch.equal(q, q.round())
        e_out = output_error(w, q * scale, H)
        e_rtn = output_error(w, nearest_integers(w, scale, -7, 7) * scale, H)
        assert e_out < 0.9 * e_rtn, (fn.__name__, seed, e_out, e_rtn)


def test_identity_hessian_gives_nearest():
    """With uncorrelated unit-variance inputs the output error is the weight error: GPTQ is RTN."""
    w, _, scale, _ = _layer_problem()
    H = torch.eye(w.shape[1]).unsqueeze(0)
    assert torch.equal(gptq_integers(w, H, scale, -7, 7), nearest_integers(w, scale, -7, 7))
    assert torch.equal(gpfq_integers(w, H, scale, -7, 7), nearest_integers(w, scale, -7, 7))


def test_grouped_layers_are_rounded_per_group():
    """A grouped weight rounded with a block-diagonal set of H equals each group rounded alone."""
    w1, H1, s1, _ = _layer_problem(8, 12, seed=1)
    w2, H2, s2, _ = _layer_problem(8, 12, seed=2)
    w = torch.cat([w1, w2])
    s = torch.cat([s1, s2])
    H = torch.cat([H1, H2])
    for fn in (gptq_integers, gpfq_integers):
        both = fn(w, H, s, -7, 7)
        assert torch.equal(both[:8], fn(w1, H1, s1, -7, 7)) and torch.equal(both[8:], fn(w2, H2, s2, -7, 7))


def test_dead_columns_get_zero_and_prepare_is_shared():
    w, H, scale, _ = _layer_problem()
    H = H.clone()
    H[0, 3, :] = 0
    H[0, :, 3] = 0
    prep = prepare(H)
    assert bool(prep.dead[0, 3]) and prep.h_inv is not None
    q = gptq_integers(w, prep, scale, -7, 7)
    assert torch.all(q[:, 3] == 0)
    assert torch.equal(q, gptq_integers(w, H, scale, -7, 7))
    assert torch.equal(round_weights("gptq", w, prep, scale, -7, 7), q)
    with pytest.raises(ValueError, match="unknown"):
        round_weights("adaround", w, prep, scale, -7, 7)


def test_hessian_of_a_grouped_conv_matches_explicit_patches():
    import torch.nn.functional as F
    from torch import nn

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).eval()
    model = nn.Sequential(nn.Identity(), conv)
    x = torch.randn(3, 4, 9, 9)
    batches = [x[:2], x[2:]]
    H = collect_hessians(model, {"1": conv}, lambda: batches, ["1"], "cpu")["1"]
    assert H.shape == (2, 18, 18)
    cols = F.unfold(x, 3, padding=1, stride=2)  # (3, 36, L): channels 0-1 are group 0
    for g in range(2):
        patches = cols[:, g * 18:(g + 1) * 18].transpose(0, 1).flatten(1)  # (18, samples)
        want = 2 / patches.shape[1] * patches @ patches.t()
        torch.testing.assert_close(H[g], want, atol=1e-5, rtol=1e-4)
    assert unfold_input(conv, x).shape == (2, 18, 3 * 25)


def test_passes_respect_the_memory_budget():
    from torch import nn

    layers = {f"c{i}": nn.Conv2d(16, 16, 3) for i in range(5)}  # 144 columns: 82944 bytes each
    assert plan_passes(layers, budget=10**9) == [list(layers)]
    passes = plan_passes(layers, budget=2 * 82944)
    assert passes == [["c0", "c1"], ["c2", "c3"], ["c4"]]


def test_store_round_trip_and_key(tmp_path):
    parts = {"model": "abc", "calibration": "def", "method": "gptq"}
    key = store_key(parts)
    assert key == store_key(dict(parts)) and key != store_key({**parts, "method": "gpfq"})
    ints = torch.randint(-7, 8, (4, 3, 3, 3), dtype=torch.int8)
    rw = RoundedWeight(ints, torch.rand(4, 1, 1, 1), {"tensor_quant.scaling_impl.value": torch.rand(4, 1, 1, 1)})
    store = WeightStore(key=key, parts=parts, weights={"model.0.conv": {4: rw}}, seconds=1.5)
    path = WeightStore.path(tmp_path, "brevitas", key)
    store.save(path)
    back = WeightStore.load(path, key)
    assert back is not None and back.source == "disk" and math.isclose(back.seconds, 1.5)
    got = back.get("model.0.conv", 4)
    assert got is not None and torch.equal(got.ints, ints) and torch.equal(got.scale, rw.scale)
    assert torch.equal(got.dequantized(), ints.float() * rw.scale)
    assert back.get("model.0.conv", 8) is None
    assert WeightStore.load(tmp_path / "absent.pt", key) is None  # nothing there: computed
    with pytest.raises(DamagedStore, match="another key"):
        WeightStore.load(path, "0" * 16)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(DamagedStore, match="sha256"):
        WeightStore.load(path, key)
    assert not list(tmp_path.glob(".*tmp"))


def _store(key: str, value: int) -> WeightStore:
    rw = RoundedWeight(torch.full((2, 3), value, dtype=torch.int8), torch.ones(2, 1))
    return WeightStore(key=key, parts={"method": "gptq"}, weights={"l": {4: rw}})


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-sidecar"])
def test_damaged_cache_file_is_rebuilt_with_one_warning(tmp_path, capsys, damage):
    """A cache file whose bytes do not match its sidecar's sha256 (or has no sidecar) is
    recomputed and rewritten, with one warning line naming the file; the next instance loads it."""
    from torch import nn

    module = nn.Linear(3, 2)
    parts = {"model": "m", "method": "gptq"}
    calls: list[str] = []

    def compute(key: str) -> WeightStore:
        calls.append(key)
        return _store(key, len(calls))

    store, how = WeightCache(tmp_path, "brevitas").get(module, parts, compute)
    assert how == "computed" and calls == [store.key]
    path = WeightStore.path(tmp_path, "brevitas", store.key)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.with_name(path.name + ".json").unlink()
    capsys.readouterr()
    again, how = WeightCache(tmp_path, "brevitas").get(module, parts, compute)
    err = capsys.readouterr().err
    assert how == "computed" and len(calls) == 2 and int(again.get("l", 4).ints[0, 0]) == 2
    assert err.count("\n") == 1 and "damaged" in err and path.name in err and "recomputing" in err
    # rewritten: a third instance loads it, silently
    third, how = WeightCache(tmp_path, "brevitas").get(module, parts, compute)
    assert how == "disk" and len(calls) == 2 and int(third.get("l", 4).ints[0, 0]) == 2
    assert capsys.readouterr().err == ""


def _layer(name: str, out: int = 4, kernel: tuple[int, int] = (3, 3), quantizable: bool = True) -> Any:
    from mpq.assignment import LayerInfo

    return LayerInfo(name=name, kind="Conv2d", in_channels=3, out_channels=out, kernel=kernel, stride=(1, 1),
                     groups=1, params=0, macs=0, index=0, block="0", quantizable=quantizable)


def test_weights_key_follows_everything_that_decides_the_weights(tmp_path):
    """mpq.keys.weights_key: model tensors, layer table, calibration list, each image file's
    content, pixels, batching, widths, method, settings and scale options; nothing else."""
    import numpy as np
    from torch import nn

    from mpq.keys import weights_key

    files = [tmp_path / f"{i}.jpg" for i in range(2)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 64)
    images = np.zeros((2, 3, 8, 8), dtype=np.float32)
    module = nn.Conv2d(3, 4, 3)
    base = dict(backend="brevitas", module=module, imgsz=8, layers=[_layer("a"), _layer("b")],
                calibration_images=images, calibration_paths=files, batch_size=2, widths=(4, 8), method="gptq",
                settings={"damp": 0.01}, scales={"weight_scale": "mse"})

    def key(**changes: Any) -> str:
        return store_key(weights_key(**{**base, **changes}))

    ref = key()
    assert key() == ref and key(layers=[_layer("a"), _layer("b"), _layer("dfl", quantizable=False)]) == ref
    other_module = nn.Conv2d(3, 4, 3)
    changed = {
        "model": key(module=other_module),
        "layer table: a layer more": key(layers=[_layer("a"), _layer("b"), _layer("c")]),
        "layer table: a shape": key(layers=[_layer("a"), _layer("b", kernel=(1, 1))]),
        "calibration list": key(calibration_paths=files[:1]),
        "pixels": key(calibration_images=images + 1),
        "batching": key(batch_size=1),
        "widths": key(widths=(4,)),
        "method": key(method="gpfq"),
        "settings": key(settings={"damp": 0.02}),
        "scales": key(scales={"weight_scale": "max"}),
        "imgsz": key(imgsz=16),
    }
    files[1].write_bytes(b"another image")  # same list, other content
    changed["an image file's content"] = key()
    assert all(k != ref for k in changed.values()), [n for n, k in changed.items() if k == ref]
    assert len(set(changed.values())) == len(changed)
