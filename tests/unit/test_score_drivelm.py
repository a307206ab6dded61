"""DriveLM: exact match and pycocoevalcap's language metrics, on cases worked out by hand."""

import json
import math

import pytest
from rich.console import Console

from mose.data import Sample, write_jsonl
from mose.eval.score import score, table
from mose.eval.score.drivelm import tokenize


def write_case(tmp_path, rows):
    refs = [Sample(id=f"d{i}", images=[], question="q?", answer=ref, task=stage)
            for i, (stage, ref, _) in enumerate(rows)]
    write_jsonl(tmp_path / "refs.jsonl", refs)
    (tmp_path / "pred.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "answer": pred}) + "\n" for i, (*_, pred) in enumerate(rows)))
    return tmp_path / "pred.jsonl", tmp_path / "refs.jsonl"


def test_tokenizer_lowercases_and_drops_punctuation_but_keeps_decimals():
    assert (tokenize("The car, at <c1,CAM_FRONT,258.3,442.5>, stops.")
            == "the car at c1 cam front 258.3 442.5 stops")
    assert tokenize("...!") == ""


def test_one_short_answer_by_hand(tmp_path):
    result = score("drivelm", *write_case(tmp_path, [("planning", "the car stops now", "The car stops.")]))
    brevity = math.exp(1 - 4 / 3)  # 3 tokens against 4: every 1-, 2-, 3-gram matches
    assert result["accuracy"] == 0.0 and result["n"] == 1
    for n in (1, 2, 3):
        assert result[f"bleu_{n}"] == pytest.approx(brevity, abs=1e-5)
    # LCS 3: precision 1, recall 3/4, F with beta 1.2 = (1 + 1.44) * 0.75 / (0.75 + 1.44)
    assert result["rouge_l"] == pytest.approx(2.44 * 0.75 / 2.19, abs=1e-5)
    assert result["cider"] == 0.0  # one document: every n-gram is in all references, idf 0


def test_exact_answers_and_stages_by_hand(tmp_path):
    rows = [("perception", "There is a white truck ahead.", "there is a white truck ahead"),
            ("planning", "Slow down, keep the lane", "slow down keep the lane.")]
    result = score("drivelm", *write_case(tmp_path, rows))
    assert result["accuracy"] == 50.0  # the inner comma makes the second answer different
    for name in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert result[name] == pytest.approx(1.0, abs=1e-5)  # the same tokens
    # No word is shared between the two samples, so every n-gram (n <= 4) has idf log 2 and
    # each hypothesis equals its reference: cosine 1 per n, times CIDEr-D's factor 10.
    assert result["cider"] == pytest.approx(10.0, abs=1e-5)
    assert list(result["by_stage"]) == ["perception", "planning"]
    assert result["by_stage"]["perception"]["accuracy"] == 100.0
    assert result["by_stage"]["planning"]["accuracy"] == 0.0
    assert json.loads(json.dumps(result)) == result  # plain floats, JSON-able
    console = Console(record=True, width=120)
    console.print(table("drivelm", result))
    text = console.export_text()
    assert "planning" in text and "cider" in text


def test_empty_answers_do_not_crash_the_metrics(tmp_path):
    result = score("drivelm", *write_case(tmp_path, [("perception", "...", ""), ("planning", "stop", "")]))
    assert result["accuracy"] == 50.0 and result["cider"] == 0.0
