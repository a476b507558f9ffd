"""Every config.json field that transformers' config class of a supported architecture accepts is
either implemented (the logits, or BERT's hidden states, match transformers) or refused with a
ValueError naming it: the test tries each field at non-default values (every accepted value for the
enum-like ones), and fails on a field it has not been told about, so a new transformers field
cannot slip by. The fields that cannot change the forward pass are listed with the reason."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from softprompt.models import load_model

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")

VOCAB = 53
SHAPES = "the model's shape: read from config.json and the weights, checked against each other"
EXEMPT = {
    "vocab_size": SHAPES, "hidden_size": SHAPES, "n_embd": SHAPES, "num_hidden_layers": SHAPES, "n_layer": SHAPES,
    "intermediate_size": SHAPES, "num_attention_heads": SHAPES, "n_head": SHAPES, "n_positions": SHAPES,
    "max_position_embeddings": "the position table's size (GPT-2, BERT), dynamic RoPE's length (tests/test_model_settings.py)",
    "initializer_range": "initialization only",
    "use_cache": "generation bookkeeping", "bos_token_id": "a token id", "eos_token_id": "a token id",
    "pad_token_id": "a token id",
    "attention_dropout": "dropout: off in inference and in softprompt's frozen model",
    "attention_probs_dropout_prob": "dropout", "hidden_dropout_prob": "dropout", "attn_pdrop": "dropout",
    "embd_pdrop": "dropout", "resid_pdrop": "dropout", "classifier_dropout": "dropout (the head's)",
    "summary_type": "GPT2DoubleHeadsModel's head, not run", "summary_use_proj": "GPT2DoubleHeadsModel's head",
    "summary_activation": "GPT2DoubleHeadsModel's head", "summary_proj_to_labels": "GPT2DoubleHeadsModel's head",
    "summary_first_dropout": "GPT2DoubleHeadsModel's head",
    "rope_parameters": "every rope_type in tests/test_model_settings.py",
    "layer_types": "with use_sliding_window and sliding_window in tests/test_window.py",
    "max_window_layers": "with use_sliding_window in tests/test_window.py",
    "_sliding_window_pattern": "Gemma3TextConfig writes it beside layer_types and never reads it back (layer_types "
                               "decides; the Hub's sliding_window_pattern in tests/test_architectures.py)",
}
TRIES = {  # field -> values to try (each alone, on top of the tiny base config)
    "llama": {"attention_bias": [True], "mlp_bias": [True], "head_dim": [12], "num_key_value_heads": [1, 4],
              "hidden_act": ["silu", "gelu", "relu", "gelu_pytorch_tanh"], "pretraining_tp": [2],
              "rms_norm_eps": [1e-2], "tie_word_embeddings": [True, False]},
    "mistral": {"head_dim": [12], "num_key_value_heads": [1], "hidden_act": ["silu", "gelu"], "rms_norm_eps": [1e-2],
                "sliding_window": [3, None], "tie_word_embeddings": [True, False]},
    "qwen2": {"num_key_value_heads": [1], "hidden_act": ["silu", "gelu"], "rms_norm_eps": [1e-2],
              "use_sliding_window": [True], "sliding_window": [3], "tie_word_embeddings": [True, False]},
    "qwen3": {"num_key_value_heads": [1], "head_dim": [12], "attention_bias": [True], "hidden_act": ["silu", "gelu"],
              "rms_norm_eps": [1e-2], "use_sliding_window": [True], "sliding_window": [3],
              "tie_word_embeddings": [True, False]},
    "gemma": {"num_key_value_heads": [1], "head_dim": [12], "attention_bias": [True],
              "hidden_act": ["gelu_pytorch_tanh", "gelu", "silu"], "rms_norm_eps": [1e-2],
              "use_bidirectional_attention": [True], "tie_word_embeddings": [True, False]},
    "gemma2": {"num_key_value_heads": [1], "head_dim": [12], "attention_bias": [True],
               "hidden_activation": ["gelu_pytorch_tanh", "gelu_new", "gelu", "silu"], "rms_norm_eps": [1e-2],
               "query_pre_attn_scalar": [7], "attn_logit_softcapping": [0.5, None],
               "final_logit_softcapping": [0.5, None], "sliding_window": [3, None],
               "layer_types": [["full_attention", "sliding_attention"]], "use_bidirectional_attention": [True],
               "tie_word_embeddings": [True, False]},
    "gemma3_text": {"num_key_value_heads": [1], "head_dim": [12], "attention_bias": [True],
                    "hidden_activation": ["gelu_pytorch_tanh", "gelu", "silu"], "rms_norm_eps": [1e-2],
                    "query_pre_attn_scalar": [7], "attn_logit_softcapping": [0.5],
                    "final_logit_softcapping": [0.5], "sliding_window": [3, None],
                    "layer_types": [["full_attention", "sliding_attention"]], "use_bidirectional_attention": [True],
                    "rope_parameters": [{"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 20.0}},
                                        {"full_attention": {"rope_type": "default", "rope_theta": 300.0},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 20.0}}],
                    "tie_word_embeddings": [True, False]},
    "gpt2": {"activation_function": ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "tanh"],
             "scale_attn_weights": [False], "scale_attn_by_inverse_layer_idx": [True],
             "reorder_and_upcast_attn": [True], "layer_norm_epsilon": [1e-2], "n_inner": [40],
             "tie_word_embeddings": [False], "add_cross_attention": [True]},
    "bert": {"hidden_act": ["gelu", "relu", "gelu_new", "silu"], "layer_norm_eps": [1e-2], "type_vocab_size": [3],
             "is_decoder": [True], "add_cross_attention": [True], "tie_word_embeddings": [False]},
}
BASE = {
    "llama": dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_window_layers=1, sliding_window=3),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32),
    "bert": dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=32),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
           "gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
           "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
           "bert": ("BertConfig", "BertModel")}


def _base(arch):
    base = dict(BASE["llama" if arch in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text") else arch],
                initializer_range=0.2)
    if arch not in ("qwen2", "qwen3"):
        base.pop("max_window_layers", None)
    if arch == "llama":
        base.pop("sliding_window")
    if arch == "mistral":
        base["sliding_window"] = None
    return base


@pytest.mark.parametrize("arch", sorted(TRIES))
def test_every_config_field_is_tried_or_exempt(arch):
    fields = set(getattr(transformers, CLASSES[arch][0])().to_dict()) - set(transformers.PretrainedConfig().to_dict())
    fields |= {"tie_word_embeddings"}
    missing = sorted(fields - set(TRIES[arch]) - set(EXEMPT))
    assert not missing, f"{arch}: config fields neither tried nor exempt: {missing}"


def _cases():
    for arch, tries in sorted(TRIES.items()):
        for field, values in tries.items():
            for value in values:
                yield pytest.param(arch, field, value, id=f"{arch}-{field}={value}")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch, field, value", list(_cases()))
def test_config_field_matches_transformers_or_is_refused(arch, field, value, tmp_path):
    config_cls, model_cls = (getattr(transformers, n) for n in CLASSES[arch])
    kw = _base(arch)
    kw[field] = value
    if field == "add_cross_attention" and arch == "bert":
        kw["is_decoder"] = True
    try:
        cfg = config_cls(**kw)
    except (ValueError, TypeError) as exc:  # transformers itself refuses the combination
        pytest.fail(f"transformers rejects {field}={value!r}: {exc}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model_cls(cfg).eval()
        with torch.no_grad():  # non-trivial biases and norms, so that a missed one shows
            for name, p in ref.named_parameters():
                if name.endswith("bias") or "norm" in name.lower():
                    p.add_(0.3 * torch.randn_like(p))
        ref.save_pretrained(tmp_path)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9))
    try:
        ours = load_model(tmp_path)
    except ValueError as exc:
        assert field in str(exc), f"refused without naming {field}: {exc}"
        return
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids))
    if arch == "bert":
        got, want = ours.forward(ids), out.last_hidden_state.numpy()
    else:
        got, want = ours.logits(ids), out.logits.numpy()
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0,
                               err_msg=f"{arch}: {field}={value!r} loads but gives other numbers than transformers")


# --------------------------------------------------------------------------- GGUF metadata
@pytest.mark.filterwarnings("ignore")
def test_gguf_keys_are_read_or_refused(tmp_path):
    """The llama.* keys the loader reads change what transformers' config fields change (RMS
    epsilon, RoPE base); a key it does not know, a head size or expert count it does not run, or a
    tensor it would leave out is refused, naming it."""
    import gguf
    from test_model_settings import write_llama_gguf

    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**dict(_base("llama"), rms_norm_eps=1e-2, rope_parameters={"rope_type": "default",
                                                                                              "rope_theta": 777.0}))
    ref = transformers.LlamaForCausalLM(cfg).eval()
    write_llama_gguf(ref, tmp_path / "m.gguf")
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(load_model(tmp_path / "m.gguf").logits(ids), want, atol=1e-4 * np.abs(want).max(), rtol=0)
    U32 = gguf.GGUFValueType.UINT32
    for extra, message in [
        ([("llama.attention.sliding_window", (4, U32))], r"GGUF keys \['llama.attention.sliding_window'\]"),
        ([("llama.attention.key_length", (7, U32))], r"blk.0.attn_q.weight has 48 rows, but llama.attention.key_length \(the head size\) 7"),
        ([("llama.expert_count", (4, U32))], "llama.expert_count 4 is not supported"),
        ([("llama.rope.dimension_count", (6, U32))], "llama.rope.dimension_count 6 is not supported"),
    ]:
        write_llama_gguf(ref, tmp_path / "bad.gguf", extra=extra)
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / "bad.gguf")
    # a tensor the llama forward has no place for (a bias) is refused too
    import gguf as g

    w = g.GGUFReader(str(tmp_path / "m.gguf"))
    writer = g.GGUFWriter(str(tmp_path / "bias.gguf"), "llama")
    for field in w.fields.values():
        if field.name.startswith("llama."):
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in w.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape([int(n) for n in reversed(t.shape)]))
    writer.add_tensor("blk.0.attn_q.bias", np.zeros(48, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"tensors \['blk.0.attn_q.bias'\] are not supported"):
        load_model(tmp_path / "bias.gguf")
