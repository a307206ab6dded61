"""The data commands end to end, as a user runs them."""

import json
import subprocess
import sys

import pytest


def mose(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "mose.cli", *args], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_world_generate_then_annotate_a_subset(tmp_path):
    out = mose("world", "generate", "--domain", "driving", "--n", "60", "--seed", "3",
               "--out", str(tmp_path), "--weight", "cyclist=0.1")
    assert "wrote 60 samples" in out.stdout
    annotated = tmp_path / "labelled.jsonl"
    out = mose("annotate", "--taxonomy", "driving", "--data", str(tmp_path / "train.jsonl"),
               "--out", str(annotated), "--rules", "world-driving", "--limit", "25", "--seed", "1")
    assert "coverage of 25 samples" in out.stdout and "fell to general" in out.stdout
    records = [json.loads(line) for line in annotated.read_text().splitlines()]
    assert len(records) == 25 and all(r["skills"] for r in records)
    assert all((tmp_path / r["images"][0]).is_file() for r in records)


@pytest.mark.slow
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "x", "images": [], "question": "q", "choices": "a|b"}\n')
    out = mose("annotate", "--taxonomy", "driving", "--data", str(data), "--out",
               str(tmp_path / "o.jsonl"), "--rules", "world-driving", check=False)
    assert out.returncode == 2 and "record x, field 'choices'" in out.stdout
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_data_convert_prints_records_per_task_and_skips_bad_ones(tmp_path):
    from formats import robo2vlm

    rows = [{"id": "a", "question": "Is the robot's gripper open?", "choices": "['Yes', 'No', 'x', 'y']",
             "correct_answer": 0},
            {"id": "b", "question": "q", "choices": "not a list", "correct_answer": 0}]
    shard = robo2vlm(tmp_path / "shards" / "part-0.parquet", rows)
    out = tmp_path / "robo.jsonl"
    failed = mose("data", "convert", "--format", "robo2vlm", str(shard.parent), str(out), check=False)
    assert failed.returncode == 2 and "record b, field 'choices'" in failed.stdout
    assert not out.exists()
    result = mose("data", "convert", "--format", "robo2vlm", "--skip-bad", str(shard.parent), str(out))
    assert "wrote 1 records" in result.stdout and "robo2vlm" in result.stdout
    assert "skipped (bad)" in result.stdout
    assert (tmp_path / "robo_images").is_dir()


@pytest.mark.slow
def test_annotate_sends_only_what_the_rules_left_undecided_to_the_llm(tmp_path):
    from fake_llm import FakeLLM

    records = [{"id": "a", "images": [], "question": "What is inside the red rectangle?",
                "answer": "car", "task": "region_perception"},
               {"id": "b", "images": [], "question": "Describe the whole scene.", "answer": "ok",
                "task": "general_perception"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    fake = FakeLLM()
    try:
        out = mose("annotate", "--taxonomy", "driving", "--data", str(data), "--out",
                   str(tmp_path / "o.jsonl"), "--rules", "world-driving", "--llm-base-url", fake.url,
                   "--llm-model", "fake", "--no-llm-images")
    finally:
        fake.close()
    assert "1 asked" in out.stdout and len(fake.requests) == 1
    assert "Describe the whole scene" in json.dumps(fake.requests[0])
    labelled = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert labelled[0]["skills"]["perception"] == "vehicle"  # by the rules
    assert labelled[1]["skills"] == {"perception": "vehicle", "prediction": "crossing", "planning": "yield"}
