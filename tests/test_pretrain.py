"""benchmarks/pretrain.py: only unlabeled train inputs are read; the folder loads as a HF model; cached."""

import importlib.util
import json
from pathlib import Path

import pytest

from aim_ds.data.core import ORDERS

REPO = Path(__file__).resolve().parents[1]
SECRET = "zzlabelleak"


def _load():
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "benchmarks" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def data_dir(tmp_path):
    """A Long Sequence-shaped folder whose answers and dev/test splits carry a word no input has."""
    root = tmp_path / "longsequence"
    for split in ("train", "dev", "test"):
        (root / split).mkdir(parents=True)
        for task in ORDERS[1]:
            rows = [
                {
                    "id": str(i),
                    "input": f"{task} example {i} says hello world. Answer:",
                    "output": f"{SECRET}{i}" if split == "train" else "x",
                }
                for i in range(6)
            ]
            if split != "train":
                rows = [dict(r, input=f"{SECRET} held out {r['id']}") for r in rows]
            (root / split / f"{task}_T5.json").write_text(json.dumps(rows))
    return root


def test_texts_are_train_inputs_only(data_dir):
    texts = _load().unlabeled_texts(str(data_dir))
    assert len(texts) == 6 * len(ORDERS[1])
    assert not any(SECRET in t for t in texts)


def test_pretrain_writes_a_loadable_cached_folder(data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mod = _load()
    args = [
        "--data-dir",
        str(data_dir),
        "--model",
        str(REPO / "configs" / "tiny_llama.json"),
        "--out-root",
        str(tmp_path / "out"),
        "--epochs",
        "1",
        "--block",
        "16",
        "--batch-size",
        "4",
        "--vocab-size",
        "300",
    ]
    assert mod.main(args) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] >= 1 and record["curve"][-1]["val_loss"] < record["curve"][0]["val_loss"]
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 128
    assert not [t for t in tok.get_vocab() if SECRET[:6] in t.lower()]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folder left behind

    assert mod.main(args) == 0  # the same arguments: the cached folder, nothing retrained
    assert "cached" in capsys.readouterr().out
    assert json.loads((out / "pretrain.json").read_text()) == record
