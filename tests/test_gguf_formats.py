"""GGUF files of every block type, kept in their format: a tiny Llama written with each type (and a
Q4_K_M-style mix: Q4_K layers, Q6_K attn_v / ffn_down / output), loaded, and compared with the same
weights dequantized by gguf and run by transformers; the memory the loaded matrices hold against the
file's tensor bytes; the expanded load (keep_quantized=False) gives the same logits."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
from test_linear import random_blocks

from softprompt.models import load_model
from softprompt.models.quant import QuantizedWeight, StackedWeight

torch = pytest.importorskip("torch", reason="torch is a test extra: pip install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install '.[test]'")

Q = gguf.GGMLQuantizationType
VOCAB = 64
# gguf 0.19 quantizes these itself; the k-quants and IQ4_NL it only reads: random blocks then.
WRITABLE = {Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _permute(w, n_heads):  # llama.cpp's converter: rotate-half rows -> interleaved pairs
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_heads):
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Types softprompt does not keep quantized: loaded expanded to float32 by gguf's dequantizer.
# Random blocks with the f16 super-block scale at this byte offset set to a sane value.
EXPANDED = {Q.IQ4_XS: 0, Q.TQ2_0: 64, Q.IQ2_XXS: 0}


def _encode(values, qtype, rng):
    """(raw bytes uint8 [rows, row bytes] in qtype, the float32 values gguf dequantizes them to)."""
    if qtype in EXPANDED:
        per_block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, nb = values.shape[0], values.shape[1] // per_block
        raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)
        d = rng.uniform(0.001, 0.01, (rows, nb)).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        raw[..., EXPANDED[qtype]:EXPANDED[qtype] + 2] = d
        raw = raw.reshape(rows, nb * size)
    elif qtype in WRITABLE:
        raw = gguf.quants.quantize(values, qtype)
        raw = raw.view(np.uint8).reshape(values.shape[0], -1)
    else:
        raw = random_blocks(rng, values.shape[0], values.shape[1], qtype.name.lower())
    return raw, np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(values.shape)


def write_typed_gguf(path, types, rng, tie=False):
    """A tiny Llama (hidden 256, 2 layers, 4 query / 2 kv heads of 64, MLP 512) as a GGUF whose
    matrices have the types `types(name) -> GGMLQuantizationType`, and the transformers model holding
    exactly the values gguf dequantizes them to. -> (transformers model, file tensor bytes)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    new, nbytes = {}, 0

    def matrix(name, key, heads=None):
        nonlocal nbytes
        values = sd[key] if heads is None else _permute(sd[key], heads)
        raw, deq = _encode(values, types(name), rng)
        w.add_tensor(name, raw, raw_dtype=types(name))
        nbytes += raw.nbytes
        new[key] = deq if heads is None else _unpermute(deq, heads)

    def vector(name, key):
        nonlocal nbytes
        w.add_tensor(name, sd[key])
        nbytes += sd[key].nbytes

    matrix("token_embd.weight", "model.embed_tokens.weight")
    vector("output_norm.weight", "model.norm.weight")
    if not tie:
        matrix("output.weight", "lm_head.weight")
    for i in range(2):
        for ours, theirs in NAMES.items():
            key = f"model.layers.{i}.{theirs}.weight"
            if ours.endswith("norm"):
                vector(f"blk.{i}.{ours}.weight", key)
            else:
                matrix(f"blk.{i}.{ours}.weight", key, {"attn_q": 4, "attn_k": 2}.get(ours))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for key, v in new.items():
            model.state_dict()[key].copy_(torch.from_numpy(v))
    return model, nbytes


def matrix_bytes(model):
    """Bytes the loaded model holds in its matrices (views of another counted once)."""
    arrays = {id(a): a for a in model.arrays()}
    return sum(a.nbytes for a in arrays.values() if getattr(a, "base", None) is None or id(a.base) not in arrays)


def _check(path, ref, nbytes, rng, formats):
    ours = load_model(path)
    ids = rng.integers(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    got = ours.logits(ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    expanded = load_model(path, keep_quantized=False)
    np.testing.assert_allclose(expanded.logits(ids), got, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    held = {getattr(ours.layers[0]["qkv"], "format", None) or type(ours.layers[0]["qkv"]).__name__,
            ours.embed.format, ours.output_embeddings().format}
    assert held <= formats | {"StackedWeight"}, held
    # the matrices stay the size they are in the file (norms: float32 as in the file too)
    assert matrix_bytes(ours) <= 1.1 * nbytes, (matrix_bytes(ours), nbytes)
    return ours


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL,
                                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_every_type_loads_kept_and_matches_transformers(qtype, tmp_path, rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, nbytes = write_typed_gguf(tmp_path / "m.gguf", lambda name: qtype, rng)
    ours = _check(tmp_path / "m.gguf", ref, nbytes, rng, {qtype.name.lower()})
    assert isinstance(ours.layers[1]["down"], QuantizedWeight) and ours.layers[1]["down"].format == qtype.name.lower()


@pytest.mark.parametrize("qtype", list(EXPANDED), ids=lambda q: q.name)
def test_types_not_kept_load_expanded_with_ggufs_values(qtype, tmp_path, rng):
    """IQ4_XS, TQ2_0, IQ2_XXS (not in ops.QUANT_FORMATS): the matrices load as float32, each value
    what gguf dequantizes, and the logits match transformers holding those values."""
    ref, _ = write_typed_gguf(tmp_path / "m.gguf", lambda name: qtype, rng)
    ours = load_model(tmp_path / "m.gguf")
    assert isinstance(ours.embed, np.ndarray) and ours.embed.dtype == np.float32
    np.testing.assert_array_equal(ours.embed, ref.model.embed_tokens.weight.detach().numpy())
    ids = rng.integers(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours.logits(ids), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_q4_k_m_mix_keeps_each_matrix_in_its_type(tmp_path, rng):
    """Q4_K_M's recipe: Q6_K for attn_v, ffn_down and the output head, Q4_K elsewhere; q/k/v then run
    as one GEMM per format (StackedWeight), and a training gradient through them matches the
    expanded model's."""
    from softprompt import PromptTuning

    def types(name):
        return Q.Q6_K if any(k in name for k in ("attn_v", "ffn_down", "output.weight")) else Q.Q4_K

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, nbytes = write_typed_gguf(tmp_path / "m.gguf", types, rng)
    ours = _check(tmp_path / "m.gguf", ref, nbytes, rng, {"q4_k", "q6_k"})
    qkv = ours.layers[0]["qkv"]
    assert isinstance(qkv, StackedWeight) and [p.format for p in qkv.parts] == ["q4_k", "q4_k", "q6_k"]
    assert ours.layers[0]["gate_up"].format == "q4_k" and ours.layers[0]["down"].format == "q6_k"
    expanded = load_model(tmp_path / "m.gguf", keep_quantized=False)
    adapter = PromptTuning.for_model(ours, 4, init="random", seed=0)
    ids = rng.integers(0, VOCAB, (3, 7))
    grads = []
    for model in (ours, expanded):
        hidden, cache = model.forward(ids, adapter=adapter, keep_cache=True)
        grads.append(model.backward(np.ones_like(hidden), cache)["prompt"])
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5 * np.abs(grads[1]).max())


def test_tied_embedding_table_is_gathered_and_used_as_the_head(tmp_path, rng):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, nbytes = write_typed_gguf(tmp_path / "m.gguf", lambda name: Q.Q4_K, rng, tie=True)
    ours = _check(tmp_path / "m.gguf", ref, nbytes, rng, {"q4_k"})
    assert ours.output_embeddings() is ours.embed
    ids = np.array([[3, 5, 63]])
    np.testing.assert_array_equal(ours.embed_tokens(ids)[0], np.asarray(ours.embed)[[3, 5, 63]])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_matches_its_folder(arch, tmp_path, rng):
    """A Qwen2 / Qwen3 GGUF as llama.cpp's converter writes it (q/k/v biases for Qwen2, per-head q/k
    norms and an explicit head size for Qwen3; Q/K rows not permuted): the logits of the folder it
    came from, run by transformers; an unknown key is refused naming it."""
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
        ref = transformers.Qwen2ForCausalLM(cfg).eval()
    else:
        cfg = transformers.Qwen3Config(head_dim=24, **kw)
        ref = transformers.Qwen3ForCausalLM(cfg).eval()
    head_dim = cfg.head_dim if arch == "qwen3" else 16
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}

    def write(path, extra=()):
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(2)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        for key, value in extra:
            w.add_key_value(key, *value)
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
        w.add_tensor("output_norm.weight", sd["model.norm.weight"])
        w.add_tensor("output.weight", sd["lm_head.weight"])
        for i in range(2):
            for ours, theirs in NAMES.items():
                w.add_tensor(f"blk.{i}.{ours}.weight", sd[f"model.layers.{i}.{theirs}.weight"])
            for x in "qkv" if arch == "qwen2" else ():
                w.add_tensor(f"blk.{i}.attn_{x}.bias", sd[f"model.layers.{i}.self_attn.{x}_proj.bias"])
            for x in "qk" if arch == "qwen3" else ():
                w.add_tensor(f"blk.{i}.attn_{x}_norm.weight", sd[f"model.layers.{i}.self_attn.{x}_norm.weight"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write(tmp_path / "q.gguf")
    ours = load_model(tmp_path / "q.gguf")
    assert ours.config.model_type == arch and ("qkv_bias" in ours.layers[0]) == (arch == "qwen2")
    assert ours.config.head_dim == head_dim
    ids = rng.integers(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours.logits(ids), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    write(tmp_path / "bad.gguf", [(f"{arch}.attention.sliding_window", (64, gguf.GGUFValueType.UINT32))])
    with pytest.raises(ValueError, match=rf"GGUF keys \['{arch}.attention.sliding_window'\] are not supported"):
        load_model(tmp_path / "bad.gguf")


# VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's (Linux keeps the
# larger across fork and exec), and the parent here is pytest.
LOAD_RSS = """
import sys
import softprompt

def status(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key)) / 1024

before = status("VmRSS")
model = softprompt.load_model(sys.argv[1])
print(before, status("VmHWM"), status("VmRSS"))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_folder_holds_each_weight_once(dtype, tmp_path):
    """The process's peak memory while loading a folder stays within 1.1x of what the loaded model
    keeps (a fresh process, so the peak is the load's)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(tmp_path / "m")
    out = subprocess.run([sys.executable, "-c", LOAD_RSS, str(tmp_path / "m")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, peak, after = map(float, out.stdout.split())
    held = after - before  # MiB the loaded model keeps (~100 MiB of weights in float32)
    assert held > 40 and peak - before <= 1.1 * held, (before, peak, after)


def test_loading_the_default_gguf_holds_each_weight_once():
    """SmolLM2's GGUF (Q4_1 layers, Q8_0 embedding table, a 49k-token vocabulary): the load's peak
    within 1.1x of what the loaded model keeps."""
    import subprocess
    import sys

    from softprompt.models import default_model_path

    out = subprocess.run([sys.executable, "-c", LOAD_RSS, str(default_model_path())], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before, peak, after = map(float, out.stdout.split())
    assert after - before > 80 and peak - before <= 1.1 * (after - before), (before, peak, after)


def test_gguf_header_reads_what_gguf_reads(tmp_path, rng):
    """GGUFHeader against gguf.GGUFReader on the same files: every metadata value, every tensor's
    type, shape and bytes (SmolLM2's file, and a tiny one with k-quant tensors)."""
    from softprompt.models import default_model_path
    from softprompt.models.gguf_header import GGUFHeader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_typed_gguf(tmp_path / "k.gguf", lambda name: Q.Q5_K if "ffn" in name else Q.Q4_0, rng)
    for path in (default_model_path(), tmp_path / "k.gguf"):
        ours, theirs = GGUFHeader(path), gguf.GGUFReader(str(path))
        assert ours.fields.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
        for key, value in ours.fields.items():
            want = theirs.fields[key].contents()
            assert value == want or (isinstance(want, float) and np.float32(value) == np.float32(want)), key
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        raw = path.read_bytes()
        for a, b in zip(ours.tensors, theirs.tensors):
            assert a.tensor_type == b.tensor_type and a.shape == tuple(int(n) for n in reversed(b.shape))
            assert raw[a.offset:a.offset + a.n_bytes] == np.asarray(b.data).tobytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(raw[:5000])
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        GGUFHeader(bad)
