"""Sequence-level KD: teacher answers, filters, and a student trained on them."""


from edgekit.data.generate import filter_answers


def test_filters_count_every_drop(tmp_path):
    rows = [
        {"prompt": "a", "response": "", "truncated": False},
        {"prompt": "b", "response": "cut off", "truncated": True},
        {"prompt": "c", "response": "the same answer here", "truncated": False},
        {"prompt": "d", "response": "the same answer here", "truncated": False},
        {"prompt": "e", "response": "one two three four five six seven", "truncated": False},
        {"prompt": "f", "response": "one two three four five six seven!", "truncated": False},
        {"prompt": "g", "response": "x" * 50, "truncated": False},
        {"prompt": "h", "response": "rejected by the verifier", "truncated": False},
    ]
    verifier = tmp_path / "verify.py"
    verifier.write_text("import json, sys\nsys.exit(1 if 'rejected' in json.load(sys.stdin)['response'] else 0)\n")
    kept, stats = filter_answers(rows, 1, 40, True, 0.5, f"python3 {verifier}")
    assert [k["prompt"] for k in kept] == ["c", "e"]
    assert stats["dropped"] == {"empty": 1, "truncated": 1, "length": 1, "duplicate": 1, "near_duplicate": 1, "verifier": 1}


