"""Training data: local text or token files (or the embedded default corpus) -> packed fixed-length sequences ->
a Grain `MapDataset` of shuffled batches.

Batches are random access by step: batch s is `dataset[s]`, a pure function of (data, seed, s). The iterator state
checkpointed with the model is therefore the step number, and a resumed job sees exactly the batches an
uninterrupted one would have (no hidden iterator position to lose).

Tokens: byte-level (0..255) for text; the embedded corpus is the Python standard library's own sources (sorted by
path, so the same interpreter always gives the same corpus; nothing is downloaded) mixed with synthetic passkey
documents, where a number stated early must be recalled at the end, so that long-range selection matters.
Shapes: N sequences of L + 1 tokens (inputs are [:L], targets [1:]).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig

import grain.python as grain
import numpy as np

from indexcache_jax.train.config import DataConfig

PASSKEY_QUESTION = b" What is the pass key? The pass key is "
_FILLER = (b"The grass is green. ", b"The sky is blue. ", b"The sun is yellow. ", b"Here we go. ",
           b"There and back again. ", b"The river flows to the sea. ")


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray  # int32[N_train, L+1]
    eval: np.ndarray  # int32[N_eval, L+1]


def stdlib_text(num_bytes: int) -> bytes:
    """The first `num_bytes` of the running interpreter's standard-library .py files, in sorted path order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= num_bytes:
            break
    return b"".join(chunks)[:num_bytes]


def passkey_document(rng: np.random.Generator, length: int, depth: float) -> tuple[bytes, bytes]:
    """A document of exactly `length` bytes: filler with "The pass key is NNNNN. Remember it." at relative `depth`,
    ending with the question and the 5-digit answer (the last 5 bytes). Returns (document, answer)."""
    answer = b"%05d" % rng.integers(0, 100000)
    needle = b" The pass key is " + answer + b". Remember it. "
    body_len = length - len(PASSKEY_QUESTION) - len(answer)
    if body_len < len(needle):
        raise ValueError(f"passkey documents need length >= {len(needle) + len(PASSKEY_QUESTION) + 5}, got {length}")
    filler = b""
    while len(filler) < body_len - len(needle):
        filler += _FILLER[rng.integers(0, len(_FILLER))]
    filler = filler[:body_len - len(needle)]
    at = int(round(depth * len(filler)))
    return filler[:at] + needle + filler[at:] + PASSKEY_QUESTION + answer, answer


def _pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens (each window's last token is the next one's first target)."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens cannot fill one sequence of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx].astype(np.int32)


def tokenize_files(paths, tokenizer_file: str, vocab_size: int) -> np.ndarray:
    """The UTF-8 files' token ids under a local HuggingFace tokenizer.json, concatenated in order -> int32[N]."""
    try:
        from tokenizers import Tokenizer  # noqa: PLC0415 (optional dependency: pip install indexcache-jax[tokenizers])
    except ImportError as err:
        raise ValueError("data.tokenizer needs the `tokenizers` package: pip install 'indexcache-jax[tokenizers]'") \
            from err
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # noqa: BLE001 (the library raises a bare Exception for a malformed file)
        raise ValueError(f"data.tokenizer: {tokenizer_file} is not a readable tokenizer.json ({err})") from err
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"data.tokenizer: {tokenizer_file} has {tokenizer.get_vocab_size()} tokens but "
                         f"model.vocab_size is {vocab_size}")
    texts = [pathlib.Path(p).read_text(encoding="utf-8") for p in paths]
    return np.concatenate([np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(texts)])


def load_sequences(config: DataConfig, vocab_size: int) -> Splits:
    """All sequences of the configured source, split into train and eval (the eval split is a fixed random subset)."""
    rng = np.random.default_rng(config.seed)
    if config.source == "embedded":
        text = np.frombuffer(stdlib_text(config.embedded_bytes), np.uint8)
        seqs = _pack(text, config.seq_len)
        num_passkey = int(round(len(seqs) * config.passkey_fraction / (1 - config.passkey_fraction)))
        docs = [passkey_document(rng, config.seq_len + 1, depth)[0]
                for depth in rng.uniform(0.0, 0.8, num_passkey)]
        if docs:
            seqs = np.concatenate([seqs, np.frombuffer(b"".join(docs), np.uint8).reshape(len(docs), -1)])
    elif config.source == "text" and config.tokenizer is not None:
        seqs = _pack(tokenize_files(config.paths, config.tokenizer, vocab_size), config.seq_len)
    elif config.source == "text":
        data = b"\n".join(pathlib.Path(p).read_bytes() for p in config.paths)
        seqs = _pack(np.frombuffer(data, np.uint8), config.seq_len)
    else:
        parts = [np.fromfile(p, dtype=config.token_dtype) for p in config.paths]
        tokens = np.concatenate(parts)
        if tokens.size and int(tokens.max()) >= vocab_size:
            bad = next(p for p, part in zip(config.paths, parts, strict=True) if part.size and part.max() >= vocab_size)
            raise ValueError(f"data.paths: {bad} holds token id {int(tokens.max())} >= model vocab_size {vocab_size}")
        seqs = _pack(tokens, config.seq_len)
    if vocab_size < 256 and config.source != "tokens" and config.tokenizer is None:
        raise ValueError(f"byte-level tokens need model.vocab_size >= 256, got {vocab_size}")
    order = rng.permutation(len(seqs))
    num_eval = max(1, int(round(len(seqs) * config.eval_fraction)))
    if len(seqs) - num_eval < 1:
        raise ValueError(f"data: {len(seqs)} sequences of {config.seq_len + 1} tokens leave none for training")
    return Splits(train=seqs[order[num_eval:]], eval=seqs[order[:num_eval]])


def batches(sequences: np.ndarray, batch_size: int, seed: int) -> grain.MapDataset:
    """Shuffled, endlessly repeated batches [batch_size, L+1]; `dataset[step]` is the batch of that step."""
    return (grain.MapDataset.source(sequences)
            .shuffle(seed=seed)
            .repeat()
            .batch(batch_size, drop_remainder=True))
