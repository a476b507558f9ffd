"""Sliding-window attention: the ops' `window` (both C++ kernels and the NumPy twin, forward and
backward, float64 finite differences), and Mistral's / Qwen2's sliding windows through the model
against transformers and PEFT (virtual tokens fall out of a query's window like any key)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import make_problem, tolerance
from test_gradcheck import numeric_grad

from softprompt import PrefixTuning, PromptTuning, generate, ops
from softprompt.models import load_model

SHAPES = [  # (B, T, S, H, Hkv, D, P): decoding (S > T), several query blocks, several key chunks
    (2, 5, 5, 4, 2, 8, 3),
    (1, 1, 9, 2, 1, 8, 3),
    (2, 70, 90, 2, 2, 16, 4),
    (1, 40, 1100, 2, 1, 9, 6),
]
WINDOWS = [1, 3, 8, 65]


def windowed_loops(q, k, v, pk, pv, mask, window, scale):
    """Every (b, h, i) by loops, from positions (prefix p -> p, input j -> P + j, query i ->
    P + i + S - T): an oracle written apart from reference.py."""
    B, T, H, D = q.shape
    S, Hkv, P = k.shape[1], k.shape[2], pk.shape[-3]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        prefix_k = pk if pk.ndim == 3 else pk[b]
        prefix_v = pv if pv.ndim == 3 else pv[b]
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(T):
                x = P + i + S - T
                keys = [(prefix_k[p, hk], prefix_v[p, hk]) for p in range(P) if x - p < window]
                keys += [(k[b, j, hk], v[b, j, hk]) for j in range(S)
                         if P + j <= x and x - (P + j) < window and (mask is None or mask[b, j])]
                if keys:
                    s = scale * np.array([kk for kk, _ in keys]) @ q[b, i, h]
                    w = np.exp(s - s.max())
                    out[b, i, h] = w @ np.array([vv for _, vv in keys]) / w.sum()
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("mask", [None, "right"])
def test_reference_window_matches_loops(rng, shape, window, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, per_row=shape[0] > 1, mask=mask)
    out, _ = ops.prefix_attention_forward(q, k, v, pk, pv, causal=True, key_padding_mask=m, scale=0.7,
                                          window=window, backend="numpy")
    np.testing.assert_allclose(out, windowed_loops(q, k, v, pk, pv, m, window, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_row, mask", [(False, None), (True, "left"), (False, "random")])
def test_core_window_matches_reference(rng, kernel, dtype, shape, window, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, dtype=dtype, per_row=per_row, mask=mask)
    dout = rng.standard_normal(q.shape).astype(dtype)
    results = []
    for backend, args in (("cpp", (q, k, v, pk, pv)), ("numpy", [a.astype(np.float64) for a in (q, k, v, pk, pv)])):
        kw = dict(causal=True, key_padding_mask=m, window=window, backend=backend)
        out, lse = ops.prefix_attention_forward(*args, **kw)
        results.append((out, lse, *ops.prefix_attention_backward(dout.astype(args[0].dtype), *args, out, lse, **kw)))
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), *results):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert np.array_equal(np.isneginf(g), np.isneginf(w)), name
        finite = np.isfinite(w)
        np.testing.assert_allclose(g[finite], w[finite], **tolerance(dtype), err_msg=name)


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("shape, per_row, mask", [((2, 3, 4, 2, 1, 3, 2), False, "left"),
                                                  ((2, 4, 3, 4, 2, 5, 3), True, None)])
def test_window_gradients(rng, kernel, backend, window, shape, per_row, mask):
    q, k, v, pk, pv, m = make_problem(rng, *shape, per_row=per_row, mask=mask)
    w = rng.standard_normal(q.shape)
    kw = dict(causal=True, key_padding_mask=m, scale=0.8, window=window, backend=backend)

    def loss():
        return float(np.sum(w * ops.prefix_attention_forward(q, k, v, pk, pv, **kw)[0]))

    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, **kw)
    grads = ops.prefix_attention_backward(w, q, k, v, pk, pv, out, lse, **kw)
    for name, x, g in zip(("q", "k", "v", "prefix_k", "prefix_v"), (q, k, v, pk, pv), grads):
        np.testing.assert_allclose(g, numeric_grad(loss, x), rtol=1e-6, atol=1e-8, err_msg=name)


def test_window_input_is_checked(rng):
    q, k, v, pk, pv, _ = make_problem(rng, 1, 2, 2, 1, 1, 4, 1)
    for bad, err, msg in [(0, ValueError, "window: expected a key count >= 1"), (2.0, TypeError, "window: expected an int"),
                          (True, TypeError, "window: expected an int")]:
        with pytest.raises(err, match=msg):
            ops.prefix_attention_forward(q, k, v, pk, pv, causal=True, window=bad)
    with pytest.raises(ValueError, match="window: a sliding window needs causal=True"):
        ops.prefix_attention_forward(q, k, v, pk, pv, window=2)


# --------------------------------------------------------------------------- through the model
torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install '.[test]'")
VOCAB = 67


def _save(cls, cfg, folder):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(folder)
    return model


def _models(tmp_path):
    """Mistral with a 4-key window on every layer; Qwen2 with a 3-key window from layer 1 on."""
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)
    return {
        "mistral": (_save(t.MistralForCausalLM, t.MistralConfig(sliding_window=4, **common), tmp_path / "mistral"),
                    tmp_path / "mistral"),
        "qwen2": (_save(t.Qwen2ForCausalLM, t.Qwen2Config(use_sliding_window=True, sliding_window=3, max_window_layers=1,
                                                          **common), tmp_path / "qwen2"), tmp_path / "qwen2"),
    }


def _close(got, want):
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sliding_windows_match_transformers_and_peft(tmp_path, rng):
    for arch, (ref, folder) in _models(tmp_path).items():
        ours = load_model(folder)
        assert ours.config.sliding_window == (4 if arch == "mistral" else 3)
        ids = rng.integers(0, VOCAB, (2, 12))
        with torch.no_grad():
            want = ref(input_ids=torch.tensor(ids)).logits.numpy()
        _close(ours.logits(ids), want)
        for kind in ("prompt", "prefix"):
            adapter = (PromptTuning if kind == "prompt" else PrefixTuning).for_model(ours, 5, init="random", seed=3)
            if kind == "prefix":
                adapter.prefix *= 60
            adapter.save_pretrained(tmp_path / f"{arch}-{kind}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.PeftModel.from_pretrained(type(ref).from_pretrained(folder).eval(), tmp_path / f"{arch}-{kind}")
                with torch.no_grad():
                    peft_logits = pm.eval()(input_ids=torch.tensor(ids)).logits.numpy()[:, -12:]
            got = ours.logits(ids, adapter=adapter)
            _close(got, peft_logits)
            # the window matters here: full attention is 10x the tolerance off
            full = load_model(folder)
            full.config = type(full.config)(**{**full.config.__dict__, "sliding_window": None})
            assert np.abs(full.logits(ids, adapter=adapter) - peft_logits).max() > 1e-3 * np.abs(peft_logits).max()


def test_sliding_window_generation_with_the_cache_equals_recomputation(tmp_path, rng):
    for _, folder in _models(tmp_path).values():
        ours = load_model(folder)
        prompt = [list(rng.integers(0, VOCAB, 9)), list(rng.integers(0, VOCAB, 6))]
        for adapter in (None, PrefixTuning.for_model(ours, 3, init="random", seed=1, std=0.5),
                        PromptTuning.for_model(ours, 3, init="random", seed=1)):
            cached = generate(ours, prompt, adapter=adapter, max_new_tokens=10)
            assert cached == generate(ours, prompt, adapter=adapter, max_new_tokens=10, use_cache=False)


def test_bad_window_settings_are_refused(tmp_path):
    t = transformers
    _save(t.MistralForCausalLM, t.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value, message in [("sliding_window", 0, "sliding_window 0 is not a positive integer"),
                                ("layer_types", ["sliding_attention", "chunked_attention"], "layer_types")]:
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / "m")


def test_generation_with_a_window_and_an_adapter_does_not_depend_on_the_batch(tmp_path, rng):
    """Left padding would move the virtual tokens out of the window sooner (the window counts key
    slots): generate runs padded rows one by one, so each row gets what it gets alone."""
    for _, folder in _models(tmp_path).values():
        ours = load_model(folder)
        for adapter in (PrefixTuning.for_model(ours, 3, init="random", seed=1, std=0.5),
                        PromptTuning.for_model(ours, 3, init="random", seed=1)):
            prompt = [list(rng.integers(0, VOCAB, 9)), list(rng.integers(0, VOCAB, 2))]
            batched = generate(ours, prompt, adapter=adapter, max_new_tokens=8)
            assert batched == [generate(ours, [p], adapter=adapter, max_new_tokens=8)[0] for p in prompt]
