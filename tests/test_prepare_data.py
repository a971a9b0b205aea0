"""benchmarks/prepare_data.py on tiny synthetic releases: the folders it writes load with aim_ds.data's loaders
and hold the rows in the form the benchmarks read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from aim_ds.data.core import load_olora_tasks, load_task_list

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import prepare_data  # noqa: E402


def _put(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_olora_release_to_the_benchmark_folder(tmp_path):
    src = tmp_path / "CL_Benchmark"
    labels = ["World", "Sports", "Business", "Science or Technology"]
    _put(src / "TC" / "agnews" / "labels.json", labels)
    rows = [{"sentence": f"Title: t{i}\nText: x{i}\n", "label": labels[i % 4]} for i in range(12)]
    _put(src / "TC" / "agnews" / "train.json", rows)
    _put(src / "TC" / "agnews" / "test.json", rows[:6])  # no dev.json: dev is drawn from test.json
    _put(src / "NLI" / "CB" / "labels.json", ["entailment", "contradiction", "neutral"])
    cb = [{"sentence": f"sentence 1: a{i}\nsentence 2: b{i}", "label": "neutral"} for i in range(3)]
    _put(src / "NLI" / "CB" / "train.json", cb)
    _put(src / "NLI" / "CB" / "dev.json", cb[:2])
    out = tmp_path / "longsequence"
    assert (
        prepare_data.main(["olora", str(src), str(out), "--tasks", "agnews", "cb", "--train", "8", "--dev", "4"]) == 0
    )

    head = (  # the first line of every agnews input in the folder the BENCHMARKS.md figures were measured on
        "What is the topic of the following paragraph? Choose one from the option. Option: World, Sports, "
        "Business, Science or Technology."
    )
    agnews, cb_task = load_olora_tasks(out, ["agnews", "cb"])
    assert (len(agnews.train), len(agnews.eval)) == (8, 4)  # capped draws
    assert (len(cb_task.train), len(cb_task.eval)) == (3, 2)  # fewer rows than the caps: all of them
    assert agnews.labels == sorted(labels) and agnews.metric == "exact"
    for e in agnews.train:
        i = int(e.id.split("_")[1])
        assert e.input == f"{head}\n{rows[i]['sentence']}\nAnswer:"
        assert e.output == rows[i]["label"]
    # the same seed draws the same rows; another seed others
    again = tmp_path / "again"
    prepare_data.main(["olora", str(src), str(again), "--tasks", "agnews", "--train", "8", "--dev", "4"])
    assert (again / "train" / "agnews_T5.json").read_text() == (out / "train" / "agnews_T5.json").read_text()


def test_olora_bad_input_names_the_file(tmp_path, capsys):
    _put(tmp_path / "src" / "TC" / "agnews" / "labels.json", ["a", "b"])
    _put(tmp_path / "src" / "TC" / "agnews" / "train.json", [{"text": "no sentence"}])
    _put(tmp_path / "src" / "TC" / "agnews" / "test.json", [])
    assert prepare_data.main(["olora", str(tmp_path / "src"), str(tmp_path / "o"), "--tasks", "agnews"]) == 2
    assert 'train.json: row 0 needs string "sentence" and "label"' in capsys.readouterr().err
    assert prepare_data.main(["olora", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--tasks", "agnews"]) == 2


def test_superni_tasks_to_a_task_list(tmp_path):
    src = tmp_path / "tasks"
    for t, n in (("task001_a", 10), ("task002_b", 5)):
        _put(
            src / f"{t}.json",
            {
                "Definition": [f"Do {t}."],
                "Instances": [{"id": f"{t}-{i}", "input": f"in {i}", "output": [f"out {i}", "alt"]} for i in range(n)],
            },
        )
    out = tmp_path / "superni"
    argv = ["superni", str(src), str(out), "--tasks", "task001_a", "task002_b", "--train", "6", "--eval", "3"]
    assert prepare_data.main(argv) == 0
    a, b = load_task_list(out / "tasks.json")
    assert [a.name, b.name] == ["task001_a", "task002_b"] and a.metric == b.metric == "rougeL"
    assert (len(a.train), len(a.eval)) == (6, 3) and (len(b.train), len(b.eval)) == (3, 2)
    e = a.train[0]
    i = e.id.split("-")[1]
    assert e.input == f"Do task001_a.\n\nin {i}\nAnswer:" and e.output == f"out {i}"
    assert not {x.id for x in a.train} & {x.id for x in a.eval}


@pytest.mark.parametrize("bad", [{"Instances": [{"input": "x", "output": []}, {"input": "y", "output": ["z"]}]}, []])
def test_superni_bad_task_file(tmp_path, bad):
    _put(tmp_path / "t.json", bad)
    with pytest.raises(prepare_data.PrepareError):
        prepare_data.prepare_superni(tmp_path, tmp_path / "o", ["t"], 10, 2, 0)
