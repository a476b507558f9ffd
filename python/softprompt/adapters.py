"""Prompt tuning and prefix tuning adapters: the trainable arrays, their initialization, and files
that Hugging Face PEFT reads (and that PEFT writes).

Files (PEFT's format):
- `adapter_model.safetensors` holds one tensor, `prompt_embeddings`: [P, hidden] for prompt tuning;
  [P, num_layers * 2 * num_kv_heads * head_dim] for prefix tuning, with column
  ((2 * layer + kv) * num_kv_heads + head) * head_dim + d  (kv 0 = key, 1 = value).
- `adapter_config.json`: peft_type PROMPT_TUNING / PREFIX_TUNING, task_type, num_virtual_tokens,
  token_dim, num_attention_heads, num_layers, ... For prefix tuning on grouped-query models PEFT uses
  token_dim = num_kv_heads * head_dim and num_attention_heads = num_kv_heads; so do we.
Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _atomic_write(path: Path, write):
    """write(tmp_path) then rename over `path`: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


HEAD_NAME = "classification_head.safetensors"  # a prefix adapter's head (see save_pretrained)


def _task_type(model):
    """PEFT's task type for an adapter without a head: an encoder's is FEATURE_EXTRACTION (PEFT
    loads it in BertModel); a head makes a prompt adapter SEQ_CLS (save_pretrained)."""
    return "FEATURE_EXTRACTION" if not model.config.causal else "CAUSAL_LM"


class _Adapter:
    kind: str
    num_virtual_tokens: int
    base_model_name_or_path: str = ""
    task_type: str = "CAUSAL_LM"
    head = None  # a losses.ClassificationHead trained with the adapter (BERT), saved beside it
    init: str | None = None  # how it was initialized (for_model's init), recorded in adapter_config.json
    init_text: str | None = None  # the text of a "text" init

    def parameters(self):
        """The trainable arrays, by name (what an optimizer updates in place): the adapter's own,
        and its classification head's ("classifier.weight", "classifier.bias") when it has one."""
        params = dict(self.own_parameters())
        if self.head is not None:
            params.update(self.head.parameters())
        return params

    def own_parameters(self):
        raise NotImplementedError

    def gradients(self, grads):
        """Gradients matching parameters(), from the model's backward dict ("prompt" or "prefix")
        and, with a head, the head's gradients in the same dict."""
        out = dict(self.own_gradients(grads))
        if self.head is not None:
            out.update({k: grads[k] for k in self.head.parameters()})
        return out

    def own_gradients(self, grads):
        raise NotImplementedError

    def num_trainable(self):
        return sum(a.size for a in self.parameters().values())

    def print_trainable_parameters(self, model):
        """The seed's table: trainable count and its share of the model."""
        trainable, frozen = self.num_trainable(), model.num_parameters()
        print(f"trainable params: {trainable:,} || all params: {trainable + frozen:,} || "
              f"trainable%: {100 * trainable / (trainable + frozen):.4f}")

    def save_pretrained(self, directory):
        """Writes adapter_model.safetensors and adapter_config.json into `directory` (atomically).
        With a classification head: a prompt adapter becomes PEFT's SEQ_CLS, the head saved as its
        modules_to_save (PEFT loads it in BertForSequenceClassification); a prefix adapter, which
        PEFT refuses there ("does not support past key values"), stays FEATURE_EXTRACTION (PEFT
        loads it in BertModel) and its head goes to classification_head.safetensors beside it."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        weights = {"prompt_embeddings": np.ascontiguousarray(self.peft_matrix(), dtype=np.float32)}
        config = self.peft_config()
        head = None
        if self.head is not None:
            head = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.head.parameters().items()}
        if head is not None and self.kind == "prompt":  # PEFT keeps a sequence classifier as modules_to_save
            weights.update({f"base_model.{k}": v for k, v in head.items()})
            config["modules_to_save"] = ["classifier", "score"]
            config["task_type"] = "SEQ_CLS"
        text = json.dumps(config, indent=2, sort_keys=True)
        # The files are written one by one, each atomically, the config last; the weights (and the
        # head) carry the config's hash, so a reader never takes a config with other weights: a
        # save cut between two writes is detected on load (from_pretrained).
        meta = {"adapter_config_sha256": _sha256(text)}
        if head is not None and self.kind != "prompt":  # bound to these weights too (see from_pretrained)
            head_meta = {**meta, "prompt_embeddings_sha256": _sha256(weights["prompt_embeddings"].tobytes())}
            _atomic_write(directory / HEAD_NAME, lambda tmp: save_file(head, tmp, metadata=head_meta))
        else:  # a head file from an earlier save must not be taken for this adapter's
            (directory / HEAD_NAME).unlink(missing_ok=True)
        _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata=meta))
        _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))

    @staticmethod
    def from_pretrained(directory, model=None):
        """Reads an adapter written here or by PEFT. With `model`, checks it fits that model."""
        directory = Path(directory)
        cfg_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for f in (cfg_file, weights_file):
            if not f.exists():
                raise FileNotFoundError(f"directory: {str(directory)!r} has no {f.name}")
        cfg, text = read_adapter_config(cfg_file)
        from .models.loading import read_safetensors

        tensors = read_safetensors(weights_file)
        expected = {"adapter_config_sha256": _sha256(text)}
        if "prompt_embeddings" in tensors:
            matrix_bytes = np.ascontiguousarray(tensors["prompt_embeddings"], dtype=np.float32).tobytes()
            expected["prompt_embeddings_sha256"] = _sha256(matrix_bytes)
        for f in (weights_file, directory / HEAD_NAME):
            meta = _metadata(f) if f.exists() else {}
            for key, want in expected.items():
                if meta.get(key) is not None and meta[key] != want:
                    raise ValueError(f"{directory}: {f.name} was written with another "
                                     f"{'adapter_config.json' if key.startswith('adapter') else WEIGHTS_NAME} (a save "
                                     "was cut short between the files); save the adapter again")
        if "prompt_embeddings" not in tensors:
            raise ValueError(f"{weights_file}: missing key 'prompt_embeddings' (found {sorted(tensors)})")
        matrix = np.asarray(tensors["prompt_embeddings"], dtype=np.float32)
        peft_type = cfg.get("peft_type")
        P = cfg.get("num_virtual_tokens")
        if isinstance(P, bool) or not isinstance(P, int) or P < 1:
            raise ValueError(f"{cfg_file}: num_virtual_tokens must be a positive integer, got {P!r}")
        if matrix.ndim != 2 or matrix.shape[0] != P:
            raise ValueError(f"{weights_file}: prompt_embeddings has shape {matrix.shape}, expected [{P}, ...] "
                             f"for num_virtual_tokens={P}")
        if peft_type == "PROMPT_TUNING":
            adapter = PromptTuning(matrix.copy())
        elif peft_type == "PREFIX_TUNING":
            for key in ("num_layers", "num_attention_heads", "token_dim"):
                value = cfg.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{cfg_file}: {key} must be a positive integer for PREFIX_TUNING, got {value!r}")
            L, heads = cfg["num_layers"], cfg["num_attention_heads"]
            head_dim = cfg["token_dim"] // heads
            if matrix.shape[1] != L * 2 * heads * head_dim:
                raise ValueError(f"{weights_file}: prompt_embeddings has {matrix.shape[1]} columns, expected "
                                 f"num_layers*2*token_dim = {L * 2 * heads * head_dim}")
            # [P, L, 2, Hkv, D] -> [L, 2, P, Hkv, D]
            prefix = matrix.reshape(P, L, 2, heads, head_dim).transpose(1, 2, 0, 3, 4).copy()
            adapter = PrefixTuning(prefix)
        else:
            raise ValueError(f"{cfg_file}: peft_type {peft_type!r} is not PROMPT_TUNING or PREFIX_TUNING")
        adapter.base_model_name_or_path = cfg.get("base_model_name_or_path") or ""
        adapter.task_type = cfg.get("task_type") or "CAUSAL_LM"
        peft_init = {v: k for k, v in PromptTuning._PEFT_INIT.items()}.get(cfg.get("prompt_tuning_init"))
        adapter.init = cfg.get("softprompt_init") or peft_init
        adapter.init_text = cfg.get("softprompt_init_text") or cfg.get("prompt_tuning_init_text")
        head = None
        if "base_model.classifier.weight" in tensors:
            head = {k[len("base_model."):]: v for k, v in tensors.items() if k.startswith("base_model.classifier.")}
        elif (directory / HEAD_NAME).exists():
            head = read_safetensors(directory / HEAD_NAME)
        if head is not None:
            from .losses import ClassificationHead

            if "classifier.weight" not in head or np.ndim(head["classifier.weight"]) != 2:
                raise ValueError(f"{directory}: the classification head has no 2-D classifier.weight")
            w = np.asarray(head["classifier.weight"], dtype=np.float32)
            adapter.head = ClassificationHead(w.shape[1], w.shape[0])
            adapter.head.weight[:] = w
            adapter.head.bias[:] = head.get("classifier.bias", np.zeros(w.shape[0], np.float32))
        if model is not None:
            adapter.check_model(model)
        return adapter


class PromptTuning(_Adapter):
    """A learned soft prompt [P, hidden] prepended to the input embeddings (Lester et al., 2021)."""

    kind = "prompt"

    def __init__(self, prompt):
        prompt = np.asarray(prompt)
        if prompt.ndim != 2 or prompt.shape[0] < 1:
            raise ValueError(f"prompt: expected shape [P, hidden] with P >= 1, got {prompt.shape}")
        self.prompt = np.ascontiguousarray(prompt, dtype=np.float32)

    @property
    def num_virtual_tokens(self):
        return self.prompt.shape[0]

    @classmethod
    def for_model(cls, model, num_virtual_tokens=20, init="random", *, init_text=None, label_ids=None, seed=0):
        """init: "random" (normal, with the embedding table's standard deviation), "vocab" (rows of
        the embedding table at random token ids, as the seed suggests), "text" (the embeddings of
        `init_text`'s tokens, repeated to fill P, as PEFT's TEXT init) or "labels" (Lester et al.'s
        class-label init: the label words' embeddings first, then rows of the 5,000 lowest token ids,
        which byte-level BPE vocabularies give to their most frequent merges)."""
        if int(num_virtual_tokens) < 1:
            raise ValueError(f"num_virtual_tokens: expected >= 1, got {num_virtual_tokens}")
        P, C = int(num_virtual_tokens), model.config.hidden_size
        rng = np.random.default_rng(seed)
        if init == "random":
            # the spread of what the model's lookup gives (Gemma scales its table by sqrt(hidden))
            prompt = rng.normal(0.0, embedding_std(model.embed) * float(getattr(model, "embed_scale", 1.0)), (P, C))
        elif init == "vocab":  # rows as the model's lookup gives them, as PEFT takes them
            prompt = model.embed_tokens(rng.integers(0, model.config.vocab_size, P))
        elif init == "text":
            prompt = model.embed_tokens(_text_ids(model, init_text, P))
        elif init == "labels":
            if not label_ids:
                raise ValueError("label_ids: required for init='labels'")
            ids = list(label_ids)[:P]
            common = min(5000, model.config.vocab_size)
            ids += list(rng.integers(0, common, P - len(ids)))
            prompt = model.embed_tokens(np.array(ids))
        else:
            raise ValueError(f"init: expected 'random', 'vocab', 'text' or 'labels', got {init!r}")
        adapter = cls(prompt)
        adapter.base_model_name_or_path = model.config.name_or_path
        adapter.task_type = _task_type(model)
        adapter.init, adapter.init_text = init, init_text if init == "text" else None
        return adapter

    def own_parameters(self):
        return {"prompt": self.prompt}

    def prompt_matrix(self):
        return self.prompt

    def own_gradients(self, grads):
        return {"prompt": grads["prompt"]}

    def check_model(self, model):
        if self.prompt.shape[1] != model.config.hidden_size:
            raise ValueError(f"adapter: prompt has hidden size {self.prompt.shape[1]}, the model "
                             f"{model.config.hidden_size}")

    def peft_matrix(self):
        return self.prompt

    def peft_config(self):
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": self.task_type,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.prompt.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": None,
            "num_layers": None,
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "modules_to_save": None,
            **self._init_fields(),
        }

    # PEFT's names for the inits it has; a text init also needs the text and a tokenizer name
    # (PEFT's config refuses TEXT without them, and reads the tokenizer only to initialize, never
    # in inference mode, which these files are written in).
    _PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}

    def _init_fields(self):
        if self.init in self._PEFT_INIT:
            fields = {"prompt_tuning_init": self._PEFT_INIT[self.init]}
            if self.init == "text":
                fields.update(prompt_tuning_init_text=self.init_text,
                              tokenizer_name_or_path=self.base_model_name_or_path or "unknown")
            return fields
        return {"softprompt_init": self.init} if self.init else {}


class PrefixTuning(_Adapter):
    """Learned key/value prefixes for every attention layer (Li & Liang, 2021):
    prefix [num_layers, 2 (key, value), P, num_kv_heads, head_dim]."""

    kind = "prefix"

    def __init__(self, prefix):
        prefix = np.asarray(prefix)
        if prefix.ndim != 5 or prefix.shape[1] != 2 or prefix.shape[2] < 1:
            raise ValueError(f"prefix: expected shape [num_layers, 2, P, num_kv_heads, head_dim] with P >= 1, "
                             f"got {prefix.shape}")
        self.prefix = np.ascontiguousarray(prefix, dtype=np.float32)

    @property
    def num_virtual_tokens(self):
        return self.prefix.shape[2]

    @classmethod
    def for_model(cls, model, num_virtual_tokens=20, init="random", *, init_text=None, seed=0, std=0.01):
        """init: "random" (N(0, std^2), the seed's small start), "zero", or "text" (the frozen
        model's own keys and values for `init_text`, so the adapter starts as that text would)."""
        if int(num_virtual_tokens) < 1:
            raise ValueError(f"num_virtual_tokens: expected >= 1, got {num_virtual_tokens}")
        c, P = model.config, int(num_virtual_tokens)
        shape = (c.num_layers, 2, P, c.num_kv_heads, c.head_dim)
        if init == "random":
            prefix = np.random.default_rng(seed).normal(0.0, std, shape)
        elif init == "zero":
            prefix = np.zeros(shape)
        elif init == "text":
            prefix = text_key_values(model, _text_ids(model, init_text, P))
        else:
            raise ValueError(f"init: expected 'random', 'zero' or 'text', got {init!r}")
        adapter = cls(prefix)
        adapter.base_model_name_or_path = c.name_or_path
        adapter.task_type = _task_type(model)
        adapter.init, adapter.init_text = init, init_text if init == "text" else None
        return adapter

    def own_parameters(self):
        return {"prefix": self.prefix}

    def prefix_matrix(self):
        return self.prefix

    def own_gradients(self, grads):
        return {"prefix": grads["prefix"]}

    def check_model(self, model):
        c = model.config
        want = (c.num_layers, 2, self.num_virtual_tokens, c.num_kv_heads, c.head_dim)
        if self.prefix.shape != want:
            raise ValueError(f"adapter: prefix has shape {self.prefix.shape}, this model needs {want} "
                             "[num_layers, 2, P, num_kv_heads, head_dim]")

    def peft_matrix(self):
        L, _, P, H, D = self.prefix.shape
        return self.prefix.transpose(2, 0, 1, 3, 4).reshape(P, L * 2 * H * D)

    def peft_config(self):
        L, _, P, H, D = self.prefix.shape
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": self.task_type,
            "num_virtual_tokens": P,
            "token_dim": H * D,
            "num_transformer_submodules": 1,
            "num_attention_heads": H,
            "num_layers": L,
            "encoder_hidden_size": H * D,
            "prefix_projection": False,
            "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "modules_to_save": None,
            **self._init_fields(),
        }

    def _init_fields(self):  # PEFT has no init setting for prefix tuning: softprompt's own keys
        if not self.init:
            return {}
        return {"softprompt_init": self.init, **({"softprompt_init_text": self.init_text} if self.init_text else {})}


class PrefixProjection(PrefixTuning):
    """Li & Liang's reparameterization: prefix = base + MLP(embedding), MLP = Linear-tanh-Linear.
    The trainable arrays are the embedding [P, Hkv*D] and the MLP; `base` is the (fixed) start,
    e.g. the model's own keys and values for a text, and the last layer starts at zero, so training
    starts from exactly `base`. Saved merged into a plain prefix (PEFT's prefix_projection=False)."""

    def __init__(self, base, hidden, seed=0):
        L, _, P, H, D = base.shape
        rng = np.random.default_rng(seed)
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        width = L * 2 * H * D
        self.emb = rng.standard_normal((P, H * D)).astype(np.float32)
        self.w1 = (rng.standard_normal((hidden, H * D)) / math.sqrt(H * D)).astype(np.float32)
        self.b1 = np.zeros(hidden, dtype=np.float32)
        self.w2 = np.zeros((width, hidden), dtype=np.float32)
        self.b2 = np.zeros(width, dtype=np.float32)

    @property
    def prefix(self):
        return self.prefix_matrix()

    @prefix.setter
    def prefix(self, value):  # PrefixTuning's constructor is not used here
        raise AttributeError("PrefixProjection: the prefix is computed; set emb/w1/b1/w2/b2")

    @property
    def num_virtual_tokens(self):
        return self.base.shape[2]

    def own_parameters(self):
        return {"emb": self.emb, "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def _mlp(self):
        h = np.tanh(self.emb @ self.w1.T + self.b1)  # [P, hidden]
        return h, h @ self.w2.T + self.b2  # [P, L*2*H*D] in PEFT's column order

    def prefix_matrix(self):
        L, _, P, H, D = self.base.shape
        _, out = self._mlp()
        return self.base + out.reshape(P, L, 2, H, D).transpose(1, 2, 0, 3, 4)

    def own_gradients(self, grads):
        L, _, P, H, D = self.base.shape
        dout = grads["prefix"].transpose(2, 0, 1, 3, 4).reshape(P, L * 2 * H * D)
        h, _ = self._mlp()
        dz = (dout @ self.w2) * (1 - h * h)
        return {"emb": dz @ self.w1, "w1": dz.T @ self.emb, "b1": dz.sum(0), "w2": dout.T @ h, "b2": dout.sum(0)}

    def merged(self):
        out = PrefixTuning(self.prefix_matrix())
        out.base_model_name_or_path, out.task_type, out.head = self.base_model_name_or_path, self.task_type, self.head
        out.init, out.init_text = self.init, self.init_text
        return out

    def save_pretrained(self, directory):
        self.merged().save_pretrained(directory)


def read_adapter_config(path):
    """(dict, text) of an adapter_config.json; a ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        cfg = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg, text


def _sha256(data):
    import hashlib

    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _metadata(file):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}  # read_safetensors names the file when it reads the tensors


def _text_ids(model, text, P):
    """Token ids of `text`, cut or repeated to exactly P (PEFT's TEXT init does the same)."""
    if not text:
        raise ValueError("init_text: required for init='text'")
    if model.tokenizer is None:
        raise ValueError("init_text: this model has no tokenizer")
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"init_text: {text!r} gives no tokens")
    reps = -(-P // len(ids))
    return np.array((ids * reps)[:P])


def embedding_std(embed, rows=4096):
    """The standard deviation of every value of an embedding table [V, C]. A table kept in its file's
    format (models.quant.QuantizedWeight) is dequantized `rows` rows at a time, twice (mean, then
    the squared deviations, in float64): the whole table as float32 would be 1 GB for a
    128k-token vocabulary."""
    if isinstance(embed, np.ndarray):
        return float(np.std(embed))
    chunks = lambda: (np.asarray(embed[r:r + rows], dtype=np.float64) for r in range(0, embed.shape[0], rows))  # noqa: E731
    mean = sum(c.sum() for c in chunks()) / embed.size
    return float(np.sqrt(sum(((c - mean) ** 2).sum() for c in chunks()) / embed.size))


def text_key_values(model, ids):
    """The frozen model's keys and values for the tokens `ids` (positions 0..P-1), per layer:
    -> [num_layers, 2, P, num_kv_heads, head_dim], what a KV cache of that text holds."""
    from .models.base import KVCache

    ids = np.asarray(ids)[None]
    _, _, x, ctx = model.inject(None, model.embed_tokens(ids), np.ones(ids.shape, dtype=bool))
    ctx.kv_cache = KVCache()
    model.run(x, ctx)
    kv = ctx.kv_cache.layers
    return np.stack([np.stack((kv[i][0][0], kv[i][1][0])) for i in range(model.config.num_layers)])
