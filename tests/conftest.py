"""Shared helpers: random attention problems, tolerances, and a tiny learnable training task."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

# In CI (CI set, as .ci/run's environment has it) a skip is a failure: the README's test command
# installs every peer (torch, transformers, peft, mpi4py + mpich) and the model and data packages,
# so a test that skips there hides a regression. Outside CI a missing peer may skip, with its reason.
STRICT = bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:  # a module-level importorskip
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI is set; every peer must be installed): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI is set; every peer must be installed): {report.longrepr}"


def make_problem(rng, B, T, S, H, Hkv, D, P, *, dtype=np.float64, per_row=False, mask=None):
    """Random q [B,T,H,D], k/v [B,S,Hkv,D], prefix [P,Hkv,D] or [B,P,Hkv,D], mask [B,S] or None.

    mask: None, "right" (trailing padding), "left" (leading padding), "empty" (row 0 fully padded)
    or "random".
    """
    q = rng.standard_normal((B, T, H, D)).astype(dtype)
    k = rng.standard_normal((B, S, Hkv, D)).astype(dtype)
    v = rng.standard_normal((B, S, Hkv, D)).astype(dtype)
    pshape = (B, P, Hkv, D) if per_row else (P, Hkv, D)
    pk = rng.standard_normal(pshape).astype(dtype)
    pv = rng.standard_normal(pshape).astype(dtype)
    m = None
    if mask is not None:
        lengths = rng.integers(1, S + 1, size=B)
        pos = np.arange(S)[None, :]
        if mask == "right":
            m = pos < lengths[:, None]
        elif mask == "left":
            m = pos >= (S - lengths)[:, None]
        elif mask == "empty":
            m = pos < lengths[:, None]
            m[0] = False
        elif mask == "random":
            m = rng.random((B, S)) < 0.6
        else:
            raise ValueError(mask)
    return q, k, v, pk, pv, m


def tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def fixed_threads():
    """Every test runs on the thread count it sets, whatever else keeps this machine's cores busy:
    adaptive threads (on by default) would turn a 2-thread run into a 1-thread one under load, and
    the tests that compare thread counts would compare a count with itself. tests/test_threads.py
    turns adaptation back on where it tests it."""
    import softprompt

    softprompt.set_adaptive_threads(False)
    yield
    softprompt.set_adaptive_threads(True)


KERNELS = ["simd", "eigen"]


@pytest.fixture(params=KERNELS)
def kernel(request):
    """Runs a test once per C++ attention implementation (the fast SIMD one and the Eigen one)."""
    from softprompt import ops

    if request.param == "simd" and not ops.get_attention_kernel() == "simd":
        try:
            ops.set_attention_kernel("simd")
        except ValueError:
            pytest.skip("this build has no SIMD kernels (compiler without vector extensions)")
    previous = ops.get_attention_kernel()
    ops.set_attention_kernel(request.param)
    yield request.param
    ops.set_attention_kernel(previous)


# --------------------------------------------------------------------------- a tiny training task
WORDS = [f"w{i}" for i in range(20)]
VOCAB = ["[PAD]", "[UNK]", "Review", ":", "Sentiment", "positive", "negative", "good", "bad"] + WORDS


def _example(rng):
    """Four filler words and "good" or "bad" somewhere: the label says which."""
    from softprompt import data as data_mod

    k = int(rng.integers(0, 2))
    words = list(rng.choice(WORDS, 4))
    words.insert(int(rng.integers(0, 5)), "good" if k else "bad")
    return data_mod.Example(text=" ".join(words), label="positive" if k else "negative")


def make_tiny_task(folder, hidden_size=64, intermediate_size=128, arch="llama"):
    """(model folder, model, dataset, data file): a random Llama (or another causal architecture of
    transformers: arch "qwen3", ...; weights N(0, 0.2^2), so a prompt can steer it) with a
    word-level tokenizer, and the good/bad task, written to folder."""
    torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
    import softprompt
    from softprompt import data as data_mod
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    torch.manual_seed(0)
    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
             "gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
             "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[arch]
    config_cls, model_cls = (getattr(transformers, n) for n in names)
    cfg = config_cls(vocab_size=len(VOCAB), hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                     initializer_range=0.2, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_cls(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(0)
    examples = [_example(rng) for _ in range(600)]
    data_file = folder / "data.jsonl"
    data_file.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    dataset = data_mod.load_file(data_file)
    return folder, softprompt.load_model(folder), dataset, data_file


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"))


# --------------------------------------------------------------------------- a tiny Llama from arrays
def tiny_llama(rng, dtype=np.float32, bias=False):
    """A random 3-layer Llama (hidden 32, 4 query / 2 kv heads of 8, vocabulary 50) built from
    arrays, without torch."""
    from softprompt.models.base import ModelConfig
    from softprompt.models.llama import Llama

    c = ModelConfig(arch="llama", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,
                    vocab_size=50, intermediate_size=48, norm_eps=1e-5, attention_bias=bias, model_type="llama")
    r = lambda *s: (0.3 * rng.standard_normal(s)).astype(dtype)  # noqa: E731
    layers = []
    for _ in range(c.num_layers):
        w = {"attn_norm": 1 + r(32), "q": r(32, 32), "k": r(16, 32), "v": r(16, 32), "o": r(32, 32),
             "mlp_norm": 1 + r(32), "gate": r(48, 32), "up": r(48, 32), "down": r(32, 48)}
        if bias:
            w.update(q_bias=r(32), k_bias=r(16), v_bias=r(16))
        layers.append(w)
    return Llama(c, r(50, 32), layers, 1 + r(32))


def numeric_sample(f, x, eps=1e-6, n=12, rng=None):
    """Central differences of f() at n random entries of x -> (indices, values)."""
    rng = rng or np.random.default_rng(0)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, size=min(n, flat.size), replace=False)
    out = []
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        out.append((up - down) / (2 * eps))
    return idx, np.array(out)
