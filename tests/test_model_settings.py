"""Config settings that change a model's math, against transformers and PEFT: RoPE scaling (llama3,
linear, dynamic, yarn; both config.json spellings and GGUF), and the refusal of settings softprompt
does not implement (a ValueError naming the field, never a silently different model).

torch, transformers and peft are test extras (pinned in pyproject.toml, installed by CI)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest

from softprompt import PrefixTuning, PromptTuning
from softprompt.models import load_model
from softprompt.models.base import RopeScaling

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")
peft = pytest.importorskip("peft", reason="peft is a test extra: pip install '.[test]'")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
VOCAB = 101

# Llama 3.1's own values for llama3; the others scaled so that a 100-token input uses the scaling
# (max_position_embeddings 64, the yarn pretraining context 32).
ROPE = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                    "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0},
}


def _llama(folder, rope, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_parameters=dict(rope), tie_word_embeddings=False, initializer_range=0.2, **kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def _hub_spelling(folder, to):
    """The same model with config.json in the Hub's spelling: rope_theta beside rope_scaling."""
    shutil.copytree(folder, to)
    cfg = json.loads((to / "config.json").read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (to / "config.json").write_text(json.dumps(cfg))
    return to


def _close(got, want):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def _peft_logits(folder, adapter_dir, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        pm = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
        with torch.no_grad():
            return pm(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", sorted(ROPE))
def test_rope_scaling_matches_transformers_and_peft(name, tmp_path, rng):
    ref = _llama(tmp_path / "hf", ROPE[name])
    ids = rng.integers(0, VOCAB, (2, 100))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    for folder in (tmp_path / "hf", _hub_spelling(tmp_path / "hf", tmp_path / "hub")):
        ours = load_model(folder)
        assert ours.config.rope_scaling.rope_type == ROPE[name]["rope_type"]
        _close(ours.logits(ids), want)
    plain = load_model(tmp_path / "hf")  # the scaling matters here: without it, 10x the tolerance off
    plain.config = dataclasses.replace(plain.config, rope_scaling=RopeScaling())
    assert np.abs(plain.logits(ids) - want).max() > 1e-3 * np.abs(want).max()
    short = ids[:, :5]  # dynamic: below max_position_embeddings the plain frequencies
    with torch.no_grad():
        _close(ours.logits(short), ref(input_ids=torch.tensor(short)).logits.numpy())
    for kind in ("prompt", "prefix"):  # positions shifted by the 20 virtual tokens, as in PEFT
        adapter = (PromptTuning if kind == "prompt" else PrefixTuning).for_model(ours, 20, init="random", seed=1)
        if kind == "prefix":
            adapter.prefix *= 50  # the random start's std 0.01 would hide the prefix
        adapter.save_pretrained(tmp_path / kind)
        want = _peft_logits(tmp_path / "hf", tmp_path / kind, ids[:, :80])
        _close(ours.logits(ids[:, :80], adapter=adapter), want[:, -80:])


def _decode_against_recomputation(model, ids, new_tokens, adapter=None):
    """Generation's cache path step by step (as generate runs it) -> the largest difference of each
    step's logits from a forward over the whole sequence, relative to the largest logit."""
    from softprompt.models import layers as nn
    from softprompt.models.base import Context, KVCache

    _, _, x, ctx = model.inject(adapter, model.embed_tokens(ids), np.ones(ids.shape, bool))
    ctx.kv_cache = KVCache()
    model.run(x, ctx)
    seq, pos, worst = ids, ctx.positions[:, -1], 0.0
    for t in new_tokens:
        seq, pos = np.concatenate([seq, [[t]]], axis=1), pos + 1
        step = Context(positions=pos[:, None], key_mask=None, prefix=ctx.prefix, kv_cache=ctx.kv_cache)
        h = model.run(model.embed_tokens(np.array([[t]])), step)[0]
        cached, full = nn.linear(h[:, -1], model.output_embeddings()), model.logits(seq, adapter=adapter)[:, -1]
        worst = max(worst, float(np.abs(cached - full).max() / np.abs(full).max()))
    return worst


@pytest.mark.parametrize("name", sorted(ROPE))
def test_rope_scaling_generation_with_the_cache_equals_recomputation(name, tmp_path, rng):
    import softprompt

    _llama(tmp_path / "hf", ROPE[name])
    ours = load_model(tmp_path / "hf")
    prefix = PrefixTuning.for_model(ours, 4, init="random", seed=2, std=0.5)
    if name != "dynamic":  # the cache's keys are the recomputation's (crossing position 64 while decoding)
        for adapter in (None, prefix):
            assert _decode_against_recomputation(ours, rng.integers(0, VOCAB, (1, 50)), range(3, 27), adapter) < 1e-5
    else:  # keys cached before position 64 go stale past it (frequencies change with the length)...
        assert _decode_against_recomputation(ours, rng.integers(0, VOCAB, (1, 50)), range(3, 27)) > 1e-3
        assert ours.kv_cache_limit() == 64
    prompt = [list(rng.integers(0, VOCAB, 50)), list(rng.integers(0, VOCAB, 41))]
    for adapter in (None, prefix):  # ...so generate recomputes there: the same tokens either way
        cached = softprompt.generate(ours, prompt, adapter=adapter, max_new_tokens=24)
        recomputed = softprompt.generate(ours, prompt, adapter=adapter, max_new_tokens=24, use_cache=False)
        assert cached == recomputed


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
     r"rope_type 'longrope' is not supported"),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5},
     r"partial_rotary_factor 0.5 is not supported"),
    ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32, "something_new": 3}, r"\['something_new'\] are not supported"),
])
def test_unsupported_rope_settings_are_refused(params, message, tmp_path):
    _llama(tmp_path / "hf", {"rope_type": "default", "rope_theta": 1e4})
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = params
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "hf")


def _permute(w, heads):
    """llama.cpp's Q/K row order for interleaved RoPE (convert_hf_to_gguf.py's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path, rope_freqs=None, extra=()):
    """A float32 llama GGUF of a transformers Llama, named as llama.cpp's converter names it."""
    import gguf

    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    for key, value in extra:
        w.add_key_value(key, value[0], value[1])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama3_rope_freqs(rope, head_dim):
    """The rope_freqs tensor llama.cpp's converter writes for rope_type llama3 (the divisor of each
    frequency)."""
    import math

    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_llama3_gguf_rope_freqs_match_transformers(tmp_path, rng):
    import gguf

    ref = _llama(tmp_path / "hf", ROPE["llama3"])
    ids = rng.integers(0, VOCAB, (2, 100))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    write_llama_gguf(ref, tmp_path / "m.gguf", rope_freqs=_llama3_rope_freqs(ROPE["llama3"], 32))
    ours = load_model(tmp_path / "m.gguf")
    assert ours.config.rope_scaling.freq_factors is not None
    _close(ours.logits(ids), want)
    plain = tmp_path / "plain.gguf"  # without the tensor: a different model (so the tensor is read)
    write_llama_gguf(ref, plain)
    assert np.abs(load_model(plain).logits(ids) - want).max() > 1e-3 * np.abs(want).max()
    linear = _llama(tmp_path / "lin", ROPE["linear"])  # rope.scaling.type linear
    scaling = [("llama.rope.scaling.type", ("linear", gguf.GGUFValueType.STRING)),
               ("llama.rope.scaling.factor", (4.0, gguf.GGUFValueType.FLOAT32))]
    write_llama_gguf(linear, tmp_path / "lin.gguf", extra=scaling)
    with torch.no_grad():
        _close(load_model(tmp_path / "lin.gguf").logits(ids), linear(input_ids=torch.tensor(ids)).logits.numpy())
    write_llama_gguf(linear, tmp_path / "yarn.gguf", extra=[("llama.rope.scaling.type", ("yarn", gguf.GGUFValueType.STRING))])
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        load_model(tmp_path / "yarn.gguf")


# --------------------------------------------------------------------------- 16-bit files
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_folders_and_adapters_are_read(dtype, tmp_path, rng):
    """Weights saved in bfloat16 (most Hub checkpoints) or float16 widen exactly to float32: the
    logits are transformers' float32 forward of the same folder; a PEFT adapter saved in that dtype
    loads with the same values."""
    from softprompt import cli

    torch_dtype = getattr(torch, dtype)
    ref = _llama(tmp_path / "f32", ROPE["linear"])
    ref.to(torch_dtype).save_pretrained(tmp_path / "half")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32).eval()
    ids = rng.integers(0, VOCAB, (2, 30))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    ours = load_model(tmp_path / "half")
    fmt = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    # the matrices stay 16-bit (the GEMM widens them in its panels), the norms are float32
    assert ours.embed.format == fmt and ours.layers[0]["qkv"].format == fmt and ours.layers[1]["down"].format == fmt
    assert ours.layers[0]["attn_norm"].dtype == np.float32
    from test_gguf_formats import matrix_bytes

    file_bytes = sum(f.stat().st_size for f in (tmp_path / "half").glob("*.safetensors"))
    assert matrix_bytes(ours) <= 1.1 * file_bytes
    np.testing.assert_array_equal(np.asarray(ours.embed), ref.model.embed_tokens.weight.detach().numpy())  # exact
    _close(ours.logits(ids), want)
    expanded = load_model(tmp_path / "half", keep_quantized=False)  # float32 arrays: the same logits
    assert isinstance(expanded.embed, np.ndarray) and expanded.embed.dtype == np.float32
    np.testing.assert_allclose(expanded.logits(ids), ours.logits(ids), rtol=1e-5, atol=1e-6)
    assert cli.main(["info", "--model", str(tmp_path / "half")]) == 0
    # an adapter PEFT saved in that dtype
    pcfg = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=3)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "f32"), pcfg).to(torch_dtype)
    pm.save_pretrained(tmp_path / "adapter")
    saved = pm.prompt_encoder["default"].embedding.weight.detach().float().numpy()
    adapter = PromptTuning.from_pretrained(tmp_path / "adapter", ours)
    np.testing.assert_array_equal(adapter.prompt, saved)


def test_unreadable_weight_files_are_named(tmp_path):
    _llama(tmp_path / "hf", ROPE["linear"])
    weights = next((tmp_path / "hf").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    with pytest.raises(ValueError, match=f"{weights.name}: not a readable safetensors file"):
        load_model(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama",\n')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(tmp_path / "hf")


def test_16_bit_gpt2_folder_keeps_its_transposed_matrices_16_bit(tmp_path, rng):
    """GPT-2's Conv1D weights ([in, out] in the file) are transposed at load and stay bfloat16."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "g")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "g", dtype=torch.float32).eval()
    ours = load_model(tmp_path / "g")
    assert ours.layers[0]["c_attn"].format == "bf16" and ours.layers[0]["c_attn"].shape == (96, 32)
    ids = rng.integers(0, VOCAB, (2, 11))
    with torch.no_grad():
        _close(ours.logits(ids), ref(input_ids=torch.tensor(ids)).logits.numpy())
