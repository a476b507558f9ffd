"""Frozen models against transformers and PEFT (tiny random models built here, no downloads), padding
invariance, finite differences of the backward, and adapter files.

torch, transformers and peft are test extras (pinned in pyproject.toml, installed by CI)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import softprompt
from conftest import numeric_sample
from softprompt import PrefixTuning, PromptTuning
from softprompt.models import load_model

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install '.[test]'")

VOCAB = 97
# transformers 5.x deprecates APIs that PEFT 0.21 still calls (past_key_values, ...): not ours.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _tiny_config(arch):
    t = transformers
    if arch == "llama":  # grouped-query attention: 6 query heads over 2 kv heads
        return t.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v biases, tied embeddings
        return t.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen3":  # q/k norms, head_dim apart from hidden / heads, untied
        return t.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False)
    if arch == "gemma":  # (1 + w) norms, scaled embeddings, GeGLU, head_dim apart from hidden / heads, tied
        return t.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    if arch == "gemma2":  # pre/post norms, both soft-caps (small, so they bend), query_pre_attn_scalar, a
        # 3-key window on layer 0 (transformers' default: every other layer from the first)
        return t.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=16,
                              attn_logit_softcapping=1.0, final_logit_softcapping=1.5, sliding_window=3,
                              initializer_range=0.2)
    if arch == "gemma3":  # q/k norms, a local layer (window, own RoPE base) and a global one (linear RoPE
        # scaling), final-logit soft-capping
        return t.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=16,
                                  final_logit_softcapping=1.5, sliding_window=3, initializer_range=0.2,
                                  layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1000.0},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
    if arch == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    if arch == "bert":
        return t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{arch: (folder, transformers model)} for tiny random models saved as HF folders."""
    torch.manual_seed(0)
    out = {}
    classes = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "qwen3": transformers.Qwen3ForCausalLM,
               "gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
               "gemma3": transformers.Gemma3ForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
               "bert": transformers.BertForMaskedLM}
    for arch, cls in classes.items():
        model = cls(_tiny_config(arch)).eval()
        with torch.no_grad():  # non-trivial biases and norms, so that wrong wiring shows
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name.lower():
                    p.add_(0.1 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder)
        out[arch] = (folder, model)
    return out


def _ids(rng, B, T):
    return rng.integers(3, VOCAB, size=(B, T))


def _right_padded(rng, lengths, T):
    ids = _ids(rng, len(lengths), T)
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "bert"])
def test_logits_match_transformers(hf_models, arch, rng):
    folder, ref = hf_models[arch]
    ours = load_model(folder)
    assert ours.config.arch == ("llama" if arch in ("qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma2", "gemma3") else arch)
    ids, mask = _right_padded(rng, [9, 6, 3], 9)
    got = ours.logits(ids, mask)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    assert got.dtype == np.float32 and got.shape == (3, 9, VOCAB)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4 * scale, rtol=0)  # real tokens
    full = ours.logits(ids)  # no mask at all
    with torch.no_grad():
        want_full = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(full, want_full, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"])
def test_left_padded_logits_match_transformers(hf_models, arch, rng):
    """Left padding, transformers given the real tokens' positions (cumsum(mask) - 1)."""
    folder, ref = hf_models[arch]
    ours = load_model(folder)
    ids = _ids(rng, 3, 9)
    mask = np.arange(9)[None, :] >= np.array([0, 3, 6])[:, None]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
    got = ours.logits(ids, mask)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4 * np.abs(want).max(), rtol=0)


def _adapter(kind, model, P=4, seed=3):
    if kind == "prompt":
        return PromptTuning.for_model(model, P, init="random", seed=seed)
    return PrefixTuning.for_model(model, P, init="random", seed=seed, std=0.7)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "bert"])
@pytest.mark.parametrize("kind", [None, "prompt", "prefix"])
def test_padding_invariance(hf_models, arch, kind, rng):
    ours = load_model(hf_models[arch][0])
    adapter = None if kind is None else _adapter(kind, ours)
    seqs = [_ids(rng, 1, n)[0] for n in (7, 4, 2)]
    alone = [ours.logits(s[None], adapter=adapter)[0] for s in seqs]
    T = 8
    # Under a sliding window left padding moves the virtual tokens out of a query's window sooner,
    # as in transformers (models/base.py; tests/test_window.py), so there only right padding is invariant.
    windowed = any(ours.attention_window(i) for i in range(ours.config.num_layers))
    for side in ("right",) if windowed and adapter is not None else ("left", "right"):
        ids = np.zeros((3, T), dtype=np.int64)
        mask = np.zeros((3, T), dtype=bool)
        for b, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[b, sl], mask[b, sl] = s, True
        got = ours.logits(ids, mask, adapter=adapter)
        for b, s in enumerate(seqs):
            np.testing.assert_allclose(got[b][mask[b]], alone[b], atol=1e-5, rtol=1e-5, err_msg=f"{side} row {b}")


def _peft_model(folder, arch, adapter_dir):
    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
           "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM}[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = cls.from_pretrained(folder).eval()
        pm = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    pm.prompt_encoder["default"].embedding.weight.requires_grad_(True)  # PEFT loads prompts frozen
    return pm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_adapter_matches_peft_logits_and_gradients(hf_models, arch, kind, rng, tmp_path):
    folder = hf_models[arch][0]
    ours = load_model(folder)
    adapter = _adapter(kind, ours)
    adapter.save_pretrained(tmp_path)
    pm = _peft_model(folder, arch, tmp_path)
    ids, mask = _right_padded(rng, [6, 6], 6)
    w = rng.standard_normal((2, 6, VOCAB)).astype(np.float32)  # loss = sum(w * logits)
    with warnings.catch_warnings():  # transformers deprecates the past_key_values PEFT passes
        warnings.simplefilter("ignore", FutureWarning)
        out = pm(input_ids=torch.tensor(ids))
    logits = out.logits[:, -6:] if kind == "prompt" else out.logits  # PEFT returns the virtual rows too
    (logits * torch.tensor(w)).sum().backward()
    peft_grad = pm.prompt_encoder["default"].embedding.weight.grad.numpy()

    hidden, cache = ours.forward(ids, adapter=adapter, keep_cache=True)
    got_logits = ours.lm_logits(hidden)  # soft-capped where the model does (Gemma 2)
    scale = np.abs(got_logits).max()
    np.testing.assert_allclose(got_logits, logits.detach().numpy(), atol=1e-4 * scale, rtol=0)
    cap = ours.config.final_logit_softcapping
    dlogits = w if cap is None else w * (1 - (got_logits / cap) ** 2)
    grads = ours.backward(dlogits @ ours.output_embeddings(), cache)
    mine = grads[kind]
    if kind == "prefix":  # to PEFT's layout [P, L*2*Hkv*D]
        mine = PrefixTuning(mine).peft_matrix()
    np.testing.assert_allclose(mine, peft_grad, atol=1e-4 * np.abs(peft_grad).max(), rtol=0)


def test_bert_prompt_tuning_matches_peft_sequence_classification(hf_models, rng, tmp_path):
    from softprompt.losses import ClassificationHead

    torch.manual_seed(2)  # a checkpoint with the pooler (BertForMaskedLM has none)
    folder = tmp_path / "bert_cls"
    cfg = _tiny_config("bert")
    cfg.num_labels = 3
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    ours = load_model(folder)
    adapter = _adapter("prompt", ours)
    adapter.head = ClassificationHead(32, 3, seed=5)  # trained beside the prompt, saved with it
    adapter.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ids, mask = _right_padded(rng, [7, 4], 7)
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    loaded = PromptTuning.from_pretrained(tmp_path, ours)
    np.testing.assert_array_equal(loaded.head.weight, adapter.head.weight)
    h = ours.forward(ids, mask, adapter=loaded, keep_virtual=True)
    pooled, _ = ours.pooled(h)
    _, _, _, got = loaded.head.loss(pooled, np.zeros(2, dtype=np.int64))
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_peft_written_adapters_load_here(hf_models, rng, tmp_path):
    folder = hf_models["llama"][0]
    ours = load_model(folder)
    ids = _ids(rng, 2, 5)
    for kind, cfg in [
        ("prompt", peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)),
        ("prefix", peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
            pm = peft.get_peft_model(base, cfg).eval()
            pm.save_pretrained(tmp_path / kind)
        adapter = (PromptTuning if kind == "prompt" else PrefixTuning).from_pretrained(tmp_path / kind, ours)
        assert adapter.kind == kind and adapter.num_virtual_tokens == 3
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            want = pm(input_ids=torch.tensor(ids)).logits.numpy()[:, -5:]
        got = ours.logits(ids, adapter=adapter)
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


# --------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2", "gemma3", "gpt2", "bert"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_backward_matches_finite_differences(hf_models, arch, kind, rng):
    model = load_model(hf_models[arch][0]).astype(np.float64)
    adapter = _adapter(kind, model)
    param = adapter.parameters()[kind]
    adapter_64 = type(adapter)(param.astype(np.float64))
    adapter_64.__dict__[kind] = adapter_64.__dict__[kind].astype(np.float64)  # keep float64
    ids, mask = _right_padded(rng, [6, 4], 6)
    w = rng.standard_normal((2, 6, model.config.hidden_size))

    def loss():
        return float(np.sum(w * model.forward(ids, mask, adapter=adapter_64)))

    hidden, cache = model.forward(ids, mask, adapter=adapter_64, keep_cache=True)
    grads = model.backward(w, cache)
    x = adapter_64.parameters()[kind]
    idx, numeric = numeric_sample(loss, x, rng=rng)
    np.testing.assert_allclose(grads[kind].reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-7)
    # and the input embeddings
    emb = model.embed_tokens(ids)  # what the ids give (Gemma: scaled)

    def loss_emb():
        return float(np.sum(w * model.forward(None, mask, adapter=adapter_64, inputs_embeds=emb)))

    idx, numeric = numeric_sample(loss_emb, emb, rng=rng)
    np.testing.assert_allclose(grads["inputs_embeds"].reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- adapter files
def test_adapter_roundtrip_and_bad_files(hf_models, tmp_path):
    folder = hf_models["llama"][0]
    model = load_model(folder)
    for kind in ("prompt", "prefix"):
        a = _adapter(kind, model)
        a.save_pretrained(tmp_path / kind)
        b = type(a).from_pretrained(tmp_path / kind, model)
        np.testing.assert_array_equal(a.parameters()[kind], b.parameters()[kind])
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    gpt2 = load_model(hf_models["gpt2"][0])
    with pytest.raises(ValueError, match="prefix has shape"):
        PrefixTuning.from_pretrained(tmp_path / "prefix", gpt2)
    with pytest.raises(ValueError, match="hidden size"):
        PromptTuning.from_pretrained(tmp_path / "prompt", gpt2)
    (tmp_path / "prompt" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        PromptTuning.from_pretrained(tmp_path / "prompt")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        PromptTuning.from_pretrained(tmp_path / "missing")
    from safetensors.numpy import save_file

    save_file({"other": np.zeros((2, 2), np.float32)}, str(tmp_path / "prefix" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing key 'prompt_embeddings'"):
        PrefixTuning.from_pretrained(tmp_path / "prefix")


def test_bad_model_inputs(hf_models):
    model = load_model(hf_models["llama"][0])
    with pytest.raises(ValueError, match=r"input_ids: token ids must be in \[0, 97\)"):
        model.logits([[1, 2, 500]])
    with pytest.raises(TypeError, match="input_ids: expected integer token ids"):
        model.logits(np.ones((1, 3)))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        model.logits([[1, 2, 3]], attention_mask=[[1, 1]])
    with pytest.raises(TypeError, match="adapter: expected a PromptTuning or PrefixTuning"):
        model.logits([[1, 2, 3]], adapter="prompt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/no/such/model")


def test_parameter_counts(hf_models):
    model = load_model(hf_models["llama"][0])
    c = model.config
    assert PromptTuning.for_model(model, 10).num_trainable() == 10 * c.hidden_size
    assert PrefixTuning.for_model(model, 10).num_trainable() == c.num_layers * 2 * 10 * c.num_kv_heads * c.head_dim
    ref = hf_models["llama"][1]
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_text_initialized_prefix_reproduces_the_text(hf_models, rng):
    """A prefix from the model's own keys/values for a text acts like that text in front of the input."""
    model = load_model(hf_models["llama"][0])
    text_ids = _ids(rng, 1, 4)[0]
    from softprompt.adapters import text_key_values

    adapter = PrefixTuning(text_key_values(model, text_ids))
    ids = _ids(rng, 1, 5)
    with_prefix = model.logits(ids, adapter=adapter)
    with_text = model.logits(np.concatenate([text_ids[None], ids], axis=1))[:, 4:]
    np.testing.assert_allclose(with_prefix, with_text, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"])
@pytest.mark.parametrize("kind", [None, "prompt", "prefix"])
def test_kv_cache_generation_equals_recomputation(hf_models, arch, kind, rng):
    model = load_model(hf_models[arch][0])
    adapter = None if kind is None else _adapter(kind, model)
    prompts = [list(_ids(rng, 1, n)[0]) for n in (5, 2, 7)]  # left-padded inside
    cached = softprompt.generate(model, prompts, adapter=adapter, max_new_tokens=6)
    recomputed = softprompt.generate(model, prompts, adapter=adapter, max_new_tokens=6, use_cache=False)
    assert cached == recomputed and all(len(r) == 6 for r in cached)
    alone = [softprompt.generate(model, [p], adapter=adapter, max_new_tokens=6)[0] for p in prompts]
    assert alone == cached  # padding does not change a row
    sampled = softprompt.generate(model, prompts, adapter=adapter, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=4)
    again = softprompt.generate(model, prompts, adapter=adapter, max_new_tokens=6, temperature=0.8, top_p=0.9, seed=4,
                                use_cache=False)
    assert sampled == again


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"])
def test_greedy_generation_matches_transformers(hf_models, arch, rng):
    folder, ref = hf_models[arch]
    model = load_model(folder)
    prompt = _ids(rng, 1, 5)
    ours = softprompt.generate(model, prompt, max_new_tokens=8)[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompt), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                              pad_token_id=0)[0, 5:].tolist()
    assert ours == theirs


def test_stop_tokens_end_a_row(hf_models, rng):
    model = load_model(hf_models["llama"][0])
    prompt = [list(_ids(rng, 1, 4)[0])]
    free = softprompt.generate(model, prompt, max_new_tokens=6)[0]
    stopped = softprompt.generate(model, prompt, max_new_tokens=6, stop_tokens=[free[2]])[0]
    assert stopped == free[: free.index(free[2])]


def test_sharded_checkpoint_loads(hf_models, tmp_path, rng):
    _, ref = hf_models["llama"]
    ref.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards + model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = _ids(rng, 1, 6)
    np.testing.assert_array_equal(load_model(tmp_path).logits(ids), load_model(hf_models["llama"][0]).logits(ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2"])
@pytest.mark.parametrize("kind", [None, "prompt", "prefix"])
def test_continuation_rows_see_what_the_whole_sequence_sees(hf_models, arch, kind, rng):
    """forward(..., continuations=): each continuation row's hidden states equal those of its
    sequence with the row's tokens appended, run alone; the batch's own rows are unchanged."""
    from softprompt.models.base import Continuations

    model = load_model(hf_models[arch][0])
    adapter = None if kind is None else (softprompt.PromptTuning if kind == "prompt" else softprompt.PrefixTuning
                                         ).for_model(model, 3, init="random", seed=2)
    ids, mask = _right_padded(rng, [7, 4, 5], 7)
    cont = Continuations(np.array([1, 0, 1, 2]), _ids(rng, 4, 3), np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], bool))
    hidden, hidden_c = model.forward(ids, mask, adapter=adapter, continuations=cont)
    np.testing.assert_allclose(hidden, model.forward(ids, mask, adapter=adapter), rtol=1e-4, atol=1e-5)
    for r, b in enumerate(cont.rows):
        n, e = mask[b].sum(), cont.mask[r].sum()
        whole = model.forward(np.concatenate([ids[b, :n], cont.ids[r, :e]])[None], adapter=adapter)[0]
        np.testing.assert_allclose(hidden_c[r, :e], whole[n:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="continuations need a right-padded batch"):
        model.forward(ids, mask[:, ::-1], adapter=adapter, continuations=cont)
    with pytest.raises(ValueError, match="continuations: take input_ids"):
        model.forward(ids, mask, adapter=adapter, continuations=cont, keep_virtual=True)
    with pytest.raises(ValueError, match="continuations: mask expected right-padded"):
        model.forward(ids, mask, adapter=adapter, continuations=Continuations(cont.rows, cont.ids, cont.mask[:, ::-1]))
    with pytest.raises(ValueError, match=r"continuations: expected 4 rows in \[0, 3\)"):
        model.forward(ids, mask, adapter=adapter, continuations=Continuations(np.array([0, 1, 2, 3]), cont.ids, cont.mask))
