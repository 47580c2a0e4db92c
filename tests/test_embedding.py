"""Embedding tools against numpy float64 computations of the same quantities."""
import numpy as np
import pytest
import torch

from fastlm.cli import run_main
from fastlm.embed import main as embed_main
from fastlm.generation.embedding import analogy, cosine_distance, neighbors, word_id, word_vectors
from fastlm.models.lm import load_model


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model, dictionary, _ = load_model(tiny_run)
    return model, dictionary


def _np_cosine(m, q):
    return (m @ q) / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))


@pytest.mark.parametrize("matrix, attribute", [("input", "embed"), ("output", "linear")])
def test_distance_neighbors_analogy_match_numpy(loaded, matrix, attribute):
    model, dictionary = loaded
    vectors = word_vectors(model, matrix)
    m = getattr(model, attribute).weight.detach().numpy().astype(np.float64)
    a, b, c = (dictionary.word2idx[w] for w in ("w1", "w5", "w9"))

    expected = 1 - m[a] @ m[b] / (np.linalg.norm(m[a]) * np.linalg.norm(m[b]))
    assert abs(cosine_distance(vectors, a, b) - expected) < 1e-12

    sims = _np_cosine(m, m[a])
    sims[a] = -np.inf
    order = np.argsort(-sims)[:4]
    got = neighbors(vectors, a, 4)
    assert [i for i, _ in got] == order.tolist()
    assert np.allclose([s for _, s in got], sims[order], atol=1e-12)

    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    sims = _np_cosine(m, unit[b] - unit[a] + unit[c])  # 3CosAdd, as gensim's most_similar
    sims[[a, b, c]] = -np.inf
    order = np.argsort(-sims)[:3]
    got = analogy(vectors, a, b, c, 3)
    assert [i for i, _ in got] == order.tolist()
    assert np.allclose([s for _, s in got], sims[order], atol=1e-12)


# man : king = woman : ?  Only 3CosAdd answers queen once king is 1000 times longer: the raw offset
# king − man + woman then points almost along king, whose near-twin is prince.
ANALOGY_WORDS = {"man": [1.0, 0.0, 0.0], "king": [1.0, 1.0, 0.0], "woman": [0.0, 0.0, 1.0],
                 "queen": [0.0, 1.0, 1.0], "prince": [1.0, 1.0, 0.1]}
MAN, KING, WOMAN, QUEEN, PRINCE = range(len(ANALOGY_WORDS))


@pytest.mark.parametrize("stretched", list(ANALOGY_WORDS), ids=[f"{w}-1000x-longer" for w in ANALOGY_WORDS])
def test_analogy_answers_do_not_depend_on_vector_lengths(stretched):
    rows = np.array(list(ANALOGY_WORDS.values()))
    stretched_rows = rows.copy()
    stretched_rows[list(ANALOGY_WORDS).index(stretched)] *= 1000
    expected = analogy(torch.tensor(rows), MAN, KING, WOMAN, k=2)
    got = analogy(torch.tensor(stretched_rows), MAN, KING, WOMAN, k=2)
    assert [i for i, _ in got] == [i for i, _ in expected] == [QUEEN, PRINCE]
    assert np.allclose([s for _, s in got], [s for _, s in expected], atol=1e-12)


def test_a_long_query_word_would_win_the_raw_offset():
    """The case above discriminates: ranked by the raw offset, the long king's twin comes first."""
    rows = np.array(list(ANALOGY_WORDS.values()))
    rows[KING] *= 1000
    raw = _np_cosine(rows, rows[KING] - rows[MAN] + rows[WOMAN])
    raw[[MAN, KING, WOMAN]] = -np.inf
    assert int(np.argmax(raw)) == PRINCE
    assert analogy(torch.tensor(rows), MAN, KING, WOMAN, k=1)[0][0] == QUEEN


def test_unknown_word_names_the_closest(loaded):
    _, dictionary = loaded
    with pytest.raises(ValueError, match=r"'w13' is not in the vocabulary \(closest: w3, w1, "):
        word_id(dictionary, "w13")


def test_command_line_compares_checkpoints(tiny_run, capsys):
    argv = ["distance", "w1", "w2", "--checkpoint", str(tiny_run), "--checkpoint", str(tiny_run / "best.pt")]
    with pytest.raises(SystemExit) as exit_info:
        run_main(embed_main, argv)
    assert exit_info.value.code == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and rows[1].startswith(str(tiny_run))
    model, dictionary, _ = load_model(tiny_run)
    expected = cosine_distance(word_vectors(model), dictionary.word2idx["w1"], dictionary.word2idx["w2"])
    assert rows[1].split()[-1] == f"{expected:.4f}"

    with pytest.raises(SystemExit) as exit_info:
        run_main(embed_main, ["neighbors", "w1", "-k", "3", "--checkpoint", str(tiny_run), "--matrix", "output"])
    assert exit_info.value.code == 0 and len(capsys.readouterr().out.strip().splitlines()) == 4

    with pytest.raises(SystemExit) as exit_info:
        run_main(embed_main, ["analogy", "w1", "w2", "zebra", "--checkpoint", str(tiny_run)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: 'zebra' is not in the vocabulary") and err.count("\n") == 1


def test_analogy_help_and_answers_from_the_command_line(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(embed_main, ["analogy", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "A B C" in help_text and "3CosAdd" in help_text
    assert "unit-normalised" in help_text and "excluded" in help_text
    with pytest.raises(SystemExit) as exit_info:
        run_main(embed_main, ["analogy", "w1", "w2", "w3", "-k", "2", "--checkpoint", str(tiny_run)])
    out = capsys.readouterr().out.splitlines()
    assert exit_info.value.code == 0 and out[0].endswith("w1 : w2 = w3 : ?") and len(out) == 3
