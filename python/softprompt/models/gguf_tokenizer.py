"""The tokenizer a GGUF file describes, built with the `tokenizers` library.

A GGUF has no tokenizer.json: it stores the vocabulary (`tokenizer.ggml.tokens`), the merges or the
scores, each token's type and the special token ids under llama.cpp's key names
(gguf's constants.py, `Keys.Tokenizer`). Three kinds are rebuilt, each the way transformers' GGUF
loader (transformers/integrations/gguf/gguf_tokenizer_mapping.py) rebuilds it, so that tokenization
matches `AutoTokenizer.from_pretrained(folder, gguf_file=...)` (tests/test_gguf_tokenizers.py):

- `gpt2`: byte-level BPE. The text is first split by the regex of the file's pre-tokenizer
  (`tokenizer.ggml.pre`: Llama 3's, Qwen2's, GPT-2's, SmolLM's); a `pre` with a split not listed
  here is refused, since splitting by the wrong regex gives other tokens without any error.
- `llama`: SentencePiece BPE with byte fallback: "▁" for spaces, one prepended to the text
  (`tokenizer.ggml.add_space_prefix`, default true), merges from the file or, as llama.cpp does
  without them, from the scores (a pair of pieces that makes a token, best score first).
- `bert`: WordPiece, from llama.cpp's spelling of it (its converter writes a word-start token
  "the" as "▁the" and a continuation "##ing" as "ing"; "[CLS]"-style tokens as they are), with
  BERT's normalizer (lower case, accents stripped, CJK characters split): llama.cpp's WordPiece
  always lower-cases. Matches the tokenizer.json of the folder it was converted from.

Tokens of type control (3) become special tokens and user-defined ones (4) added tokens, so that
"<|im_start|>" stays one token. `tokenizer.ggml.add_bos_token` / `add_eos_token` set the
post-processor (softprompt's own encoding of causal-model text passes add_special_tokens=False).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)

# tokenizer.ggml.pre -> the split regex before the byte-level step (None: GPT-2's own, which
# ByteLevel applies). Llama 3's and Qwen2's regexes are those of their tokenizer.json files.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_SPLITS = {
    "default": None, "gpt-2": None, "gpt2": None,
    "smollm": "digits",  # SmolLM's tokenizer.json: each digit apart, then GPT-2's regex
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}


def gguf_tokenizer(fields: dict, path) -> Tokenizer | None:
    """The tokenizer of a GGUF's metadata `fields` (GGUFHeader.fields); None when the file has no
    vocabulary. ValueError naming the key for a tokenizer model or pre-tokenizer not built here."""
    tokens = fields.get("tokenizer.ggml.tokens")
    kind = fields.get("tokenizer.ggml.model")
    if tokens is None or kind is None:
        return None
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokens {len(tokens)}")
    if kind == "gpt2":
        tok, add_bos = _byte_level_bpe(fields, tokens, path), False
    elif kind == "llama" and str(fields.get("general.architecture", "")).startswith("gemma"):
        tokens = _gemma_spelling(tokens)
        tok, add_bos = _gemma_bpe(fields, tokens), True
    elif kind == "llama":
        tok, add_bos = _sentencepiece_bpe(fields, tokens, path), True
    elif kind == "bert":
        return _wordpiece(fields, tokens, types, path)
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama, bert)")
    _add_special(tok, tokens, types)
    _post_processor(tok, fields, tokens, add_bos)
    return tok


def _byte_level_bpe(fields, tokens, path):
    merges = fields.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{path}: a gpt2 (byte-level BPE) tokenizer needs tokenizer.ggml.merges")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in BPE_SPLITS:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (its split regex is not known here; "
                         f"supported: {', '.join(sorted(BPE_SPLITS))})")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    split = BPE_SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens, scores):
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens of
    the vocabulary, ordered by the token's score (best first), then the longer left piece, then the
    longer right piece; splits of one token in the order of their pieces' ids. The order
    transformers' `generate_merges` gives (llama.cpp merges by the same scores at run time)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep the order above
    return [(left, right) for left, right, _ in found]


def _sentencepiece_bpe(fields, tokens, path):
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{path}: a llama (SentencePiece) tokenizer needs tokenizer.ggml.merges or one "
                             "tokenizer.ggml.scores value per token")
        merges = sentencepiece_merges(tokens, scores)
    unk = _token(fields, tokens, "tokenizer.ggml.unknown_token_id") or "<unk>"
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=True,
                               byte_fallback=True, unk_token=unk if unk in tokens else None))
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _gemma_spelling(tokens):
    """Gemma's files store its whitespace-run tokens with real spaces ("  "), while its BPE works on
    text whose spaces are "▁": those tokens are respelled as "▁" * length (as transformers'
    GGUF gemma_tokenizer does), so the merges built from them match."""
    return ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _gemma_bpe(fields, tokens):
    """Gemma's SentencePiece BPE (transformers' GemmaTokenizer): spaces become "▁" (no prefix
    space), the text is split after each space, byte fallback. Its merges are rebuilt best-first in
    the order the tokens appear in the file: Gemma's scores do not follow its merge order, the
    file's order does (transformers' gemma_tokenizer; the file lists no merges)."""
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        merges = sentencepiece_merges(tokens, [-i for i in range(len(tokens))])
    unk = _token(fields, tokens, "tokenizer.ggml.unknown_token_id") or "<unk>"
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=True,
                               byte_fallback=True, unk_token=unk if unk in tokens else None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _wordpiece(fields, tokens, types, path):
    def spelled(t, kind):  # undo llama.cpp's phantom-space spelling (convert_hf_to_gguf.py, BertModel)
        if kind == CONTROL or (t.startswith("[") and t.endswith("]")):
            return t
        return t[1:] if t.startswith("\u2581") else "##" + t

    vocab = {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        vocab.setdefault(spelled(t, kind), i)
    unk = _token(fields, tokens, "tokenizer.ggml.unknown_token_id") or "[UNK]"
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    cls = _token(fields, tokens, "tokenizer.ggml.cls_token_id") or _token(fields, tokens, "tokenizer.ggml.bos_token_id")
    sep = _token(fields, tokens, "tokenizer.ggml.seperator_token_id") or _token(fields, tokens,
                                                                                "tokenizer.ggml.eos_token_id")
    if cls is None or sep is None:
        raise ValueError(f"{path}: a bert tokenizer needs tokenizer.ggml.cls_token_id and seperator_token_id")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    return tok


def _token(fields, tokens, key):
    i = fields.get(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def _add_special(tok, tokens, types):
    # A byte-level vocabulary spells every real token in its byte alphabet; a "control" token with
    # another character is a converter's mislabel that transformers skips too.
    byte_alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = isinstance(tok.pre_tokenizer, (pre_tokenizers.ByteLevel, pre_tokenizers.Sequence))
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL and (not byte_level or set(t) <= byte_alphabet)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])


def _post_processor(tok, fields, tokens, add_bos_default):
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    bos = _token(fields, tokens, "tokenizer.ggml.bos_token_id") if add_bos else None
    eos = _token(fields, tokens, "tokenizer.ggml.eos_token_id") if add_eos else None
    if bos is None and eos is None:
        return
    head, tail = (f"{bos}:0 " if bos else ""), (f" {eos}:0" if eos else "")
    special = [(t, tokens.index(t)) for t in (bos, eos) if t]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail} {head.replace(':0', ':1')}$B:1{tail.replace(':0', ':1')}",
        special_tokens=list(dict(special).items()))
