"""GGUF files of the Gemma family (gemma, gemma2, gemma3), written from transformers models with the
names and conventions of llama.cpp's converter (gguf's constants.py: every norm stored as 1 + w,
Q/K rows unpermuted, the soft-capping and window keys), against the folder they came from and
against transformers' GGUF loader (which has gemma2 and gemma3); and Gemma's SentencePiece
tokenizer against transformers' GGUF gemma tokenizer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_gguf_archs import (TEXTS, TT, _assert_same_tokens, _sd, _sentencepiece_vocab, _transformers_tokenizer,
                             load_model_tokenizer, write_gguf)

from softprompt.models import load_model

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _gemma_vocab():
    """A Gemma-style SentencePiece vocabulary: <pad> <eos> <bos> <unk> first, whitespace-run tokens
    spelled with real spaces (as Gemma's files store them), byte tokens, learned pieces."""
    tokens, scores, types = _sentencepiece_vocab()  # <unk> <s> </s>, bytes, pieces, <think>
    head = ["<pad>", "<eos>", "<bos>", "<unk>"]
    body = tokens[3:]
    runs = [" " * n for n in (2, 3, 4)]
    tokens = head + body[:256] + runs + body[256:]
    types = [TT.CONTROL, TT.CONTROL, TT.CONTROL, TT.UNKNOWN] + types[3:259] + [TT.NORMAL] * 3 + types[259:]
    scores = [0.0] * 4 + scores[3:259] + [-1.0, -2.0, -3.0] + scores[259:]
    return tokens, scores, types


def _gemma_tokenizer_meta():
    tokens, scores, types = _gemma_vocab()
    return {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types, "bos_token_id": 2,
            "eos_token_id": 1, "unknown_token_id": 3, "padding_token_id": 0, "add_space_prefix": False}


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_tokenizer_matches_transformers_gguf_tokenizer(arch, tmp_path):
    meta = _gemma_tokenizer_meta()
    path = write_gguf(tmp_path / "t.gguf", arch, {"block_count": 1}, {"token_embd.weight": np.zeros((4, 4))}, meta)
    ours = load_model_tokenizer(path)
    ref = _transformers_tokenizer(path)
    texts = TEXTS + ["two  spaces and   three    four", "   lead", "trail   "]
    # transformers adds the file's whitespace-run tokens as added tokens under their stored spelling
    # ("  ", new ids past the vocabulary); here they are the respelled vocabulary entries (their own
    # ids). The two agree on every text without a run of spaces.
    _assert_same_tokens(ours, ref, [t for t in texts if "  " not in t])
    runs = ours.encode("a  b   c", add_special_tokens=False)
    assert "\u2581\u2581" in runs.tokens and all(i < len(meta["tokens"]) for i in runs.ids)
    assert ours.decode(ours.encode("two  spaces   here").ids, skip_special_tokens=True) == "two  spaces   here"
    assert ours.encode("hi").ids[0] == 2  # <bos>


# --------------------------------------------------------------------------- models
def _tiny(arch, **kw):
    t = transformers
    common = dict(vocab_size=len(_gemma_vocab()[0]), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, initializer_range=0.2)
    common.update(kw)
    if arch == "gemma":
        cfg, cls = t.GemmaConfig(**common), t.GemmaForCausalLM
    elif arch == "gemma2":
        cfg, cls = t.Gemma2Config(**{"query_pre_attn_scalar": 16, "attn_logit_softcapping": 1.0,
                                     "final_logit_softcapping": 1.5, "sliding_window": 3, **common}), t.Gemma2ForCausalLM
    else:
        cfg, cls = t.Gemma3TextConfig(**{"query_pre_attn_scalar": common["head_dim"], "final_logit_softcapping": 1.5,
                                         "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"],
                                         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                                "rope_theta": 1000.0},
                                                             "sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 50.0}},
                                         **common}), t.Gemma3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random norms, so a norm read without its + 1 shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def gemma_gguf(path, model, arch, extra=None, tokenizer=None):
    """The GGUF llama.cpp's converter writes for a transformers Gemma, Gemma 2 or Gemma 3 (text)."""
    c, sd = model.config, _sd(model)
    kv = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
          "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
          "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "attention.key_length": c.head_dim,
          "attention.value_length": c.head_dim}
    if arch == "gemma3":
        rope = c.rope_parameters
        kv.update({"rope.freq_base": float(rope["full_attention"]["rope_theta"]),
                   "rope.freq_base_swa": float(rope["sliding_attention"]["rope_theta"])})
        for pattern in (6, 2):  # the period of the local/global layers (llama.cpp's default: 6)
            if list(c.layer_types) == ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(c.num_hidden_layers)]:
                break
        if pattern != 6:
            kv["attention.sliding_window_pattern"] = pattern
        if rope["full_attention"]["rope_type"] == "linear":
            kv.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(rope["full_attention"]["factor"])})
    else:
        kv["rope.freq_base"] = float(c.rope_parameters["rope_theta"])
    if arch != "gemma":
        kv["attention.sliding_window"] = c.sliding_window
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(c, key) is not None:
                kv[key] = float(getattr(c, key))
    kv.update(extra or {})
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if arch == "gemma":
        names["ffn_norm"] = "post_attention_layernorm"
    else:
        names.update(post_attention_norm="post_attention_layernorm", ffn_norm="pre_feedforward_layernorm",
                     post_ffw_norm="post_feedforward_layernorm")
    if arch == "gemma3":
        names.update(attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + 1}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{theirs}.weight"]
            tensors[f"blk.{i}.{ours}.weight"] = t + 1 if "norm" in ours else t
    return write_gguf(path, arch, kv, tensors, tokenizer or _gemma_tokenizer_meta())


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_gguf_matches_its_folder(arch, tmp_path, rng):
    model = _tiny(arch)
    model.save_pretrained(tmp_path / "folder")
    # Gemma 2's file states the score factor (query_pre_attn_scalar 16, not head_dim 12); Gemma 3's
    # comes from llama.cpp's rule (head_dim: query_pre_attn_scalar is head_dim here).
    extra = {"attention.scale": 16 ** -0.5} if arch == "gemma2" else {}
    path = gemma_gguf(tmp_path / "m.gguf", model, arch, extra)
    ours = load_model(path)
    folder = load_model(tmp_path / "folder")
    assert type(ours) is type(folder) and ours.tokenizer is not None
    for field in ("attention_scale", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                  "layer_types", "rope_theta", "rope_local_theta", "head_dim"):
        assert getattr(ours.config, field) == getattr(folder.config, field), field
    for scaling in ("rope_scaling", "rope_local_scaling"):
        a, b = getattr(ours.config, scaling), getattr(folder.config, scaling)
        assert (a.rope_type, a.factor) == (b.rope_type, b.factor), scaling
    ids = rng.integers(4, model.config.vocab_size, (3, 10))
    mask = np.arange(10)[None, :] >= np.array([0, 2, 5])[:, None]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
    got = ours.logits(ids, mask)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4 * np.abs(want).max(), rtol=0)
    np.testing.assert_allclose(got[mask], folder.logits(ids, mask)[mask], atol=1e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_matches_transformers_gguf_loader(arch, tmp_path, rng):
    """transformers' GGUF loader reads neither the soft-capping keys nor a local RoPE base, and takes
    query_pre_attn_scalar's default (256): the model here has those defaults (head_dim 256, caps
    50 / 30 for Gemma 2, local base 10000 and five of six layers sliding for Gemma 3)."""
    kw = dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1)
    if arch == "gemma2":
        model = _tiny(arch, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **kw)
    else:
        model = _tiny(arch, query_pre_attn_scalar=256, final_logit_softcapping=None, layer_types=None,
                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, **kw)
    path = gemma_gguf(tmp_path / "m.gguf", model, arch)
    ours = load_model(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids = rng.integers(4, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
        direct = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(want, direct, atol=1e-4 * np.abs(direct).max(), rtol=0)  # the file is right
    np.testing.assert_allclose(ours.logits(ids), want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_gemma_gguf_keys_are_refused_by_name(tmp_path):
    model = _tiny("gemma2")
    for extra, message in [({"attention.sliding_window_pattern": 3}, r"gemma2.attention.sliding_window_pattern"),
                           ({"rope.freq_base_swa": 5.0}, r"gemma2.rope.freq_base_swa"),
                           ({"attn_logit_softcapping": -1.0}, r"gemma2.attn_logit_softcapping -1.0")]:
        path = gemma_gguf(tmp_path / "bad.gguf", model, "gemma2", extra)
        with pytest.raises(ValueError, match=message):
            load_model(path)
    m3 = _tiny("gemma3")
    path = gemma_gguf(tmp_path / "bad3.gguf", m3, "gemma3", {"attn_logit_softcapping": 5.0})
    with pytest.raises(ValueError, match="gemma3.attn_logit_softcapping is not supported"):
        load_model(path)
