"""Data: vocabulary, splits, batchify, TBPTT windows and fetching PTB."""
import hashlib
import http.server
import os
import threading
from functools import partial

import pytest
import torch

from fastlm import data
from fastlm.data import Corpus, Dictionary, batchify, ensure_ptb, eval_windows, num_windows, tbptt_windows
from fastlm.errors import DataError


def _write(folder, train, valid="a b\n", test="b a\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_dictionary():
    d = Dictionary()
    assert [d.add_word(w) for w in ("x", "y", "x")] == [0, 1, 0]
    assert len(d) == 2 and d.idx2word == ["x", "y"] and d.word2idx == {"x": 0, "y": 1} and "y" in d


def test_corpus_matches_the_classic_tokenizer(tmp_path):
    # Blank line, runs of spaces and tabs, and a last line without a newline.
    train = "the cat  sat\n\n the\tdog sat \nend"
    folder = _write(tmp_path, train, valid="dog cat\n", test="sat\n")
    corpus = Corpus(folder)
    expected_words = []
    for line in train.splitlines():  # the classic per-line loop, written out
        expected_words += line.split() + ["<eos>"]
    vocab = list(dict.fromkeys(expected_words))
    assert corpus.dictionary.idx2word == vocab
    assert corpus.train.tolist() == [vocab.index(w) for w in expected_words]
    assert corpus.valid.tolist() == [vocab.index(w) for w in ("dog", "cat", "<eos>")]
    assert corpus.train.dtype == torch.int64


def test_unknown_words_map_to_unk_when_the_vocabulary_has_it(tmp_path):
    corpus = Corpus(_write(tmp_path, "a <unk> b\n", valid="a zebra\n"))
    unk = corpus.dictionary.word2idx["<unk>"]
    assert corpus.valid.tolist() == [corpus.dictionary.word2idx["a"], unk, corpus.dictionary.word2idx["<eos>"]]


def test_words_unseen_in_training_read_as_unk_which_joins_the_vocabulary(tmp_path):
    # Plain text with no <unk> token of its own: the vocabulary gains one, last.
    corpus = Corpus(_write(tmp_path, "a b\nb c\n", valid="zebra a yak\n", test="c c\n"))
    assert corpus.dictionary.idx2word == ["a", "b", "<eos>", "c", "<unk>"]
    assert corpus.valid.tolist() == [4, 0, 4, 2]


def test_a_text_with_every_word_seen_gets_no_unk(tmp_path):
    assert "<unk>" not in Corpus(_write(tmp_path, "a b\nb a\n")).dictionary


def test_a_checkpoints_vocabulary_without_unk_cannot_read_new_words(tmp_path):
    with pytest.raises(DataError, match=r"valid.txt has 2 word\(s\) not in the training vocabulary \(yak, zebra\) "
                                        r".*: a trained model scores only words it knows: replace them with <unk>"):
        Corpus(_write(tmp_path, "a b\n", valid="zebra a yak\n"), Dictionary(["a", "b", "<eos>"]))


def test_evaluating_one_split_reads_only_that_split(tmp_path):
    # train.txt full of words the model never learnt (and even a test.txt that is no file) do not stop
    # a validation score, which reads valid.txt alone.
    folder = _write(tmp_path, "zebra yak\n", valid="a b a\n")
    (folder / "test.txt").unlink()
    (folder / "test.txt").mkdir()
    corpus = Corpus(folder, Dictionary(["a", "b", "<eos>"]), splits=("valid",))
    assert corpus.valid.tolist() == [0, 1, 0, 2] and corpus.out_of_vocabulary == {"valid": 0}
    assert not hasattr(corpus, "train")


@pytest.mark.parametrize("make", [lambda path: path.mkdir(), lambda path: os.mkfifo(path)], ids=["folder", "fifo"])
def test_a_split_that_is_no_regular_file_is_named(tmp_path, make):
    folder = _write(tmp_path, "a b\n")
    (folder / "train.txt").unlink()
    make(folder / "train.txt")
    with pytest.raises(DataError, match="train.txt is not a regular file"):
        Corpus(folder)


@pytest.mark.parametrize("train, cap, vocabulary", [
    ("d a b a c a b <unk>\n", 3, ["a", "<unk>", "<eos>"]),  # <unk> and <eos> always stay, in their places
    ("d a b a c a b a b\n", 4, ["a", "b", "<eos>", "<unk>"]),  # no <unk> in the text: it comes last
    ("c b a\n", 3, ["c", "<eos>", "<unk>"]),  # ties: the first seen first
    ("a b\n", 10, ["a", "b", "<eos>"]),  # a cap above the vocabulary changes nothing
], ids=["unk-in-text", "unk-added", "ties-first-seen", "cap-above"])
def test_vocab_size_keeps_the_most_frequent_words(tmp_path, train, cap, vocabulary):
    corpus = Corpus(_write(tmp_path, train, valid="a\n", test="a\n"), max_vocab=cap)
    assert corpus.dictionary.idx2word == vocabulary
    unk = corpus.dictionary.word2idx.get("<unk>")
    assert corpus.train.tolist() == [corpus.dictionary.word2idx.get(w, unk) for w in train.split() + ["<eos>"]]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="lacks train.txt, valid.txt, test.txt"):
        Corpus(tmp_path / "nowhere")
    with pytest.raises(DataError, match="train.txt is empty"):
        Corpus(_write(tmp_path, "\n  \n"))


def test_batchify_drops_the_remainder():
    ids = torch.arange(23)
    rows = batchify(ids, 4)
    assert rows.shape == (4, 5)
    assert rows[1].tolist() == [5, 6, 7, 8, 9]  # each row is a contiguous stretch of the stream
    with pytest.raises(DataError, match="batch size must be a positive integer"):
        batchify(ids, 0)
    with pytest.raises(DataError, match="cannot fill 30 rows"):
        batchify(ids, 30)


@pytest.mark.parametrize("n, seq_len", [(31, 5), (30, 5), (12, 11), (100, 7)])
def test_tbptt_windows_follow_the_classic_loop(n, seq_len):
    rows = torch.arange(2 * n).view(2, n)
    windows = list(tbptt_windows(rows, seq_len))
    classic = [(rows[:, i:i + seq_len], rows[:, i + 1:i + 1 + seq_len]) for i in range(0, n - seq_len, seq_len)]
    assert len(windows) == len(classic) == num_windows(rows, seq_len)
    for (x, y), (cx, cy) in zip(windows, classic):
        assert torch.equal(x, cx) and torch.equal(y, cy) and x.shape == (2, seq_len)
    assert [x[0, 0].item() for x, _ in tbptt_windows(rows, seq_len, start=1)] == [x[0, 0].item() for x, _ in classic[1:]]


def test_seq_len_too_long_is_rejected_before_iteration():
    with pytest.raises(DataError, match="seq_len 10 is too long for rows of 10 tokens"):
        tbptt_windows(torch.zeros(2, 10, dtype=torch.long), 10)


def test_eval_windows_predict_every_token_but_the_first_once():
    rows = torch.arange(3 * 17).view(3, 17)
    targets = torch.cat([y for _, y in eval_windows(rows, 5)], dim=1)
    inputs = torch.cat([x for x, _ in eval_windows(rows, 5)], dim=1)
    assert torch.equal(targets, rows[:, 1:]) and torch.equal(inputs, rows[:, :-1])


def test_ptb_vocabulary_and_batches_per_epoch(ptb_dir):
    corpus = Corpus(ptb_dir)
    assert len(corpus.dictionary) == 10000
    assert corpus.train.numel() == 929589
    assert num_windows(batchify(corpus.train, 20), 30) == 1549


# -- downloading -------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 with small stand-ins for the three PTB files."""
    remote = tmp_path / "remote"
    remote.mkdir()
    contents = {s: f"some words here\nand {'<unk>' if s == 'train' else 'more'}\n".encode() for s in data.SPLITS}
    for split, payload in contents.items():
        (remote / f"ptb.{split}.txt").write_bytes(payload)
    monkeypatch.setattr(data, "PTB_SHA256", {s: hashlib.sha256(p).hexdigest() for s, p in contents.items()})
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(remote))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield remote, f"http://127.0.0.1:{server.server_address[1]}/", contents
    server.shutdown()
    server.server_close()


def test_download_over_http_checks_sums_and_writes_the_files(served, tmp_path):
    remote, url, contents = served
    folder = ensure_ptb(tmp_path / "ptb", url)
    for split, payload in contents.items():
        assert (folder / f"{split}.txt").read_bytes() == payload
    assert sorted(p.name for p in folder.iterdir()) == ["test.txt", "train.txt", "valid.txt"]  # no temp files left
    assert Corpus(folder).train.numel() == 7  # 5 words and 2 <eos>


def test_download_from_a_file_url(served, tmp_path):
    remote, _, contents = served
    folder = ensure_ptb(tmp_path / "ptb", remote.as_uri() + "/")
    assert (folder / "valid.txt").read_bytes() == contents["valid"]


def test_corrupted_download_is_rejected_and_not_written(served, tmp_path):
    remote, url, _ = served
    (remote / "ptb.valid.txt").write_bytes(b"tampered\n")
    with pytest.raises(DataError, match=r"checksum mismatch for ptb.valid.txt.*save them in .*ptb as train.txt, "
                                        r"valid.txt, test.txt"):
        ensure_ptb(tmp_path / "ptb", url)
    assert not (tmp_path / "ptb" / "valid.txt").exists()


def test_offline_says_where_to_put_the_files(tmp_path):
    folder = tmp_path / "ptb"
    with pytest.raises(DataError) as err:
        ensure_ptb(folder, "http://127.0.0.1:9/", timeout=5)  # port 9 (discard): nothing listens
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert all(name in message for name in ("train.txt", "valid.txt", "test.txt"))


def test_real_ptb_over_http_matches_the_published_sums(ptb_dir, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    for split in data.SPLITS:
        (remote / f"ptb.{split}.txt").write_bytes((ptb_dir / f"{split}.txt").read_bytes())
    folder = ensure_ptb(tmp_path / "ptb", remote.as_uri() + "/")
    assert len(Corpus(folder).dictionary) == 10000


def test_a_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
    folder = _write(tmp_path, "a b\n")
    (folder / "train.txt").write_bytes("\ufeffa b\n".encode("utf-8"))
    assert Corpus(folder).dictionary.idx2word[:2] == ["a", "b"]


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    folder = _write(tmp_path, "a b\n")
    (folder / "valid.txt").write_bytes("a b\nb a\ncaf\xe9 a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"valid.txt is not UTF-8 text \(byte 0xe9 on line 3\): convert it"):
        Corpus(folder)


def test_a_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    folder = _write(tmp_path, "a b\n")
    real = type(folder).read_text

    def denied(path, *args, **kwargs):
        if path.name == "test.txt":
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(type(folder), "read_text", denied)
    with pytest.raises(DataError, match=r"cannot read data file .*test.txt \(Permission denied\): check its permissions"):
        Corpus(folder)


def test_too_few_tokens_names_the_split_and_its_flag():
    with pytest.raises(DataError, match=r"valid.txt's 3 tokens cannot fill 4 rows: use a smaller --eval-batch-size"):
        data.batchify_for_eval(torch.arange(3), 4, "valid")
    with pytest.raises(DataError, match=r"test.txt's 7 tokens leave nothing to score in 4 rows"):
        data.batchify_for_eval(torch.arange(7), 4, "test")
    with pytest.raises(DataError, match=r"train.txt's 3 tokens cannot fill 4 rows: use a smaller --batch-size"):
        batchify(torch.arange(3), 4)
