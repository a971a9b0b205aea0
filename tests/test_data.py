"""Loaders, DataErrors, memory buffer, tokenizer, encoding (no DeepSpeed)."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from aim_ds.data import (
    CausalLMExamples,
    DataError,
    Example,
    Task,
    collate,
    encode_prompt,
    encode_target,
    generate_generation_tasks,
    get_tokenizer,
    load_tasks,
    select_memory,
)
from aim_ds.data.core import ORDERS

REPO = Path(__file__).resolve().parents[1]
LONGSEQ = (REPO / ".." / "shared" / "data" / "longsequence").resolve()
needs_data = pytest.mark.skipif(
    not (LONGSEQ / "train").is_dir(),
    reason=f"benchmark data not found at {LONGSEQ} (../shared/data/longsequence "
    f"next to the repo); data-loader tests skipped",
)


# ---------------------------------------------------------------- O-LoRA benchmarks
@needs_data
def test_standard_order4_defaults():
    tasks = load_tasks("standard", data_dir=str(LONGSEQ), max_train=40, max_eval=30, seed=1)
    assert [t.name for t in tasks] == ["dbpedia", "amazon", "yahoo", "agnews"]
    for t in tasks:
        assert len(t.train) == 40 and len(t.eval) == 30
        assert t.metric == "exact" and t.labels == sorted(t.labels)
        assert all(e.output in t.labels for e in t.eval)
    assert len(tasks[0].labels) == 14 and len(tasks[3].labels) == 4
    # train subsample is seeded, eval subsample fixed (independent of the run seed)
    again = load_tasks("standard", data_dir=str(LONGSEQ), max_train=40, max_eval=30, seed=1)
    other = load_tasks("standard", data_dir=str(LONGSEQ), max_train=40, max_eval=30, seed=2)
    assert [e.id for e in again[0].train] == [e.id for e in tasks[0].train]
    assert [e.id for e in other[0].train] != [e.id for e in tasks[0].train]
    assert [e.id for e in other[0].eval] == [e.id for e in tasks[0].eval]


@needs_data
def test_eval_subsample_is_stratified():
    (t,) = load_tasks("tasks:agnews", data_dir=str(LONGSEQ), max_train=10, max_eval=100)
    counts = Counter(e.output for e in t.eval)
    assert sum(counts.values()) == 100 and set(counts) == set(t.labels)
    assert max(counts.values()) - min(counts.values()) <= 12


@needs_data
@pytest.mark.parametrize("bench,order", [("long", None), ("long", 2), ("long", 3), ("standard", 5), ("standard", 6)])
def test_orders(bench, order):
    tasks = load_tasks(bench, data_dir=str(LONGSEQ), order=order, max_train=5, max_eval=5)
    assert [t.name for t in tasks] == ORDERS[order or 1]
    assert all(t.metric == "exact" for t in tasks)


@needs_data
def test_mnli_unlabelled_dev_rows_dropped():
    (t,) = load_tasks("tasks:mnli", data_dir=str(LONGSEQ), max_train=50)
    assert len(t.eval) == 494 and "-" not in {e.output for e in t.eval}


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(benchmark="standard", order=1), "unknown order 1"),
        (dict(benchmark="long", order=4), "unknown order 4"),
        (dict(benchmark="default", order=3), "unknown order 3"),
        (dict(benchmark="standard"), "needs data_dir"),
        (dict(benchmark="nonsense"), "unknown benchmark 'nonsense'"),
        (dict(benchmark="default", max_train=0), "max_train"),
    ],
)
def test_bad_arguments(kwargs, msg):
    with pytest.raises(DataError, match=msg):
        load_tasks(**kwargs)


@needs_data
def test_unknown_task_name():
    with pytest.raises(DataError, match="unknown task name 'dbpedai'.*spelling"):
        load_tasks("tasks:dbpedia,dbpedai", data_dir=str(LONGSEQ), max_train=5, max_eval=5)


def test_data_dir_without_split(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"no dev/ folder"):
        load_tasks("standard", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"does not exist"):
        load_tasks("long", data_dir=str(tmp_path / "nope"))


def test_olora_missing_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "dev").mkdir()
    rows = [{"id": "0", "input": "x", "output": "a"}]
    (tmp_path / "train" / "agnews_T5.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"task 'agnews'.*dev/agnews_T5.json does not exist"):
        load_tasks("tasks:agnews", data_dir=str(tmp_path))


# ---------------------------------------------------------------- user JSON task lists
def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _user(tmp_path, train, ev, metric=None, name="t1"):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    _write(d / f"{name}_train.json", train)
    _write(d / f"{name}_eval.json", ev)
    spec = {"name": name, "train": f"data/{name}_train.json", "eval": f"data/{name}_eval.json"}
    if metric:
        spec["metric"] = metric
    return _write(tmp_path / "tasks.json", {"tasks": [spec]})


ROWS = [{"id": str(i), "input": f"q{i}", "output": "yes" if i % 2 else "no"} for i in range(10)]


def test_user_json_ok(tmp_path):
    p = _user(tmp_path, ROWS, ROWS[:4])
    (t,) = load_tasks(str(p))
    assert t.name == "t1" and t.labels == ["no", "yes"] and t.metric == "exact"
    assert len(t.train) == 10 and len(t.eval) == 4
    gen = [{"input": f"q{i}", "output": f"answer {i}"} for i in range(60)]
    (g,) = load_tasks(str(_user(tmp_path, gen, gen[:3], "rougeL")))
    assert g.labels is None and g.metric == "rougeL" and g.train[0].id == "t1_0"
    (g2,) = load_tasks(str(_user(tmp_path, gen, gen[:3])))  # > 50 distinct outputs -> rougeL
    assert g2.labels is None and g2.metric == "rougeL"


@pytest.mark.parametrize(
    "train,ev,metric,msg",
    [
        ('[{"input": "a", "output": ', ROWS, None, r"t1_train.json is not valid JSON"),
        ([{"input": "a"}], ROWS, None, r"entry 0 of .*t1_train.json .*\"output\""),
        ([{"inp": "a", "output": "b"}], ROWS, None, r"entry 0 .*\"input\""),
        ([], ROWS, None, r"t1_train.json is an empty list"),
        (ROWS, [], None, r"t1_eval.json is an empty list"),
        ({"input": "a"}, ROWS, None, r"holds a JSON dict, expected a list"),
        (ROWS, [{"input": "q", "output": "maybe"}], None, r"label 'maybe'.*never occurs in the train"),
        (ROWS, ROWS, "bleu", r"metric 'bleu'"),
    ],
)
def test_user_json_errors(tmp_path, train, ev, metric, msg):
    p = _user(tmp_path, train, ev, metric)
    with pytest.raises(DataError, match=msg):
        load_tasks(str(p))


def test_user_json_structure_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing.json does not exist"):
        load_tasks(str(tmp_path / "missing.json"))
    p = _write(tmp_path / "bad.json", "{oops")
    with pytest.raises(DataError, match=r"bad.json is not valid JSON"):
        load_tasks(str(p))
    p = _write(tmp_path / "empty.json", {"tasks": []})
    with pytest.raises(DataError, match=r"non-empty \"tasks\" list"):
        load_tasks(str(p))
    p = _write(tmp_path / "nofile.json", {"tasks": [{"name": "x", "train": "a.json", "eval": "b.json"}]})
    with pytest.raises(DataError, match=r"task 'x': data file .*a.json does not exist"):
        load_tasks(str(p))
    p = _write(tmp_path / "dup.json", {"tasks": [{"name": "x", "train": "a", "eval": "b"}] * 2})
    with pytest.raises(DataError, match=r"appears twice"):
        load_tasks(str(p))
    p = _write(tmp_path / "nokey.json", {"tasks": [{"name": "x", "train": "a"}]})
    with pytest.raises(DataError, match=r"tasks\[0\] needs string fields"):
        load_tasks(str(p))


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- generated benchmark
def test_default_benchmark():
    tasks = load_tasks("default")
    assert [t.name for t in tasks] == ["alpha", "beta", "gamma", "delta"]
    again = load_tasks("default")
    assert [e.input for e in again[2].train] == [e.input for e in tasks[2].train]
    for t in tasks:
        assert t.labels == ["blue", "gold", "green", "red"] and t.metric == "exact"
        assert len(t.train) == 640 and len(t.eval) == 200
        assert t.name in t.train[0].input and set(Counter(e.output for e in t.train)) == set(t.labels)
    # the tasks conflict: the same inputs, label maps that agree on at most one category of four
    from itertools import combinations

    from aim_ds.data.default import CLASSIFICATION_RULES

    perms = [p for _, p in CLASSIFICATION_RULES[:4]]
    for p, q in combinations(perms, 2):
        assert sum(x == y for x, y in zip(p, q)) <= 1
    # the label is a function of the last word; alpha and delta agree on exactly 4 of 16 words
    maps = [{e.input.split()[-1]: e.output for e in t.train} for t in tasks]
    for m, t in zip(maps, tasks):
        assert all(m[e.input.split()[-1]] == e.output for e in t.train + t.eval)
    assert sum(maps[0][w] == maps[3][w] for w in maps[0]) == 4
    sub = load_tasks("default", max_train=100, max_eval=20)
    assert len(sub[0].train) == 100 and len(sub[0].eval) == 20


def test_default_generation_family():
    tasks = load_tasks("default-gen", max_eval=10)
    assert [t.name for t in tasks] == ["echo", "copy", "reverse", "swap"]
    for t in tasks:
        assert t.metric == "rougeL" and t.labels is None and len(t.eval) == 10
    e = tasks[2].train[0]
    words = e.input.split("Words: ")[1].split()
    assert len(words) == 4 and e.output.split() == words[::-1]
    assert tasks[0].train[0].output == " ".join([tasks[0].train[0].input.split()[-1]] * 2)
    (c,) = generate_generation_tasks(rules=["copy"])
    assert c.train[0].output == c.train[0].input.split("Words: ")[1]


# ---------------------------------------------------------------- memory
def _cls_task(counts):
    train = [Example(f"{c}{i}", f"in {c} {i}", c) for c, n in counts.items() for i in range(n)]
    return Task("t", train, train[:1], "exact", sorted(counts))


def test_memory_class_balanced():
    t = _cls_task({"a": 500, "b": 300, "c": 150, "d": 50})
    mem = select_memory(t, 0.02, seed=0)  # 20 slots over 4 classes
    assert Counter(e.output for e in mem) == {"a": 5, "b": 5, "c": 5, "d": 5}
    assert [e.id for e in select_memory(t, 0.02, seed=0)] == [e.id for e in mem]
    assert [e.id for e in select_memory(t, 0.02, seed=1)] != [e.id for e in mem]
    # at least one per class even when the fraction gives fewer slots
    t2 = _cls_task({"a": 90, "b": 5, "c": 3, "d": 2})
    mem2 = select_memory(t2, 0.01, seed=0)
    assert Counter(e.output for e in mem2) == {"a": 1, "b": 1, "c": 1, "d": 1}
    # a small class gives its spare slots to the others
    mem3 = select_memory(_cls_task({"a": 100, "b": 100, "c": 2}), 0.2, seed=0)  # 40 slots
    assert Counter(e.output for e in mem3) == {"a": 19, "b": 19, "c": 2}
    assert len({e.id for e in mem3}) == 40


def test_memory_generation_random():
    (t,) = generate_generation_tasks(rules=["reverse"], n_train=500)
    mem = select_memory(t, 0.02, seed=3)
    assert len(mem) == 10 and len({e.id for e in mem}) == 10
    assert mem == select_memory(t, 0.02, seed=3)
    with pytest.raises(ValueError):
        select_memory(t, 0.0, seed=0)


# ---------------------------------------------------------------- tokenizer + encoding
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_tokenizer(load_tasks("default"), str(tmp_path_factory.mktemp("tok")), vocab_size=512)


def test_tokenizer_deterministic_and_cached(tmp_path):
    tasks = load_tasks("default", max_train=200)
    t1 = get_tokenizer(tasks, str(tmp_path / "a"), vocab_size=400)
    t2 = get_tokenizer(tasks, str(tmp_path / "b"), vocab_size=400)
    assert t1.get_vocab() == t2.get_vocab()
    assert (tmp_path / "a" / os.listdir(tmp_path / "a")[0] / "tokenizer.json").read_text() == (
        tmp_path / "b" / os.listdir(tmp_path / "b")[0] / "tokenizer.json"
    ).read_text()
    entries = os.listdir(tmp_path / "a")
    assert len(entries) == 1 and entries[0].startswith("tokenizer-")  # no temp dirs left
    mtime = os.path.getmtime(tmp_path / "a" / entries[0] / "tokenizer.json")
    t3 = get_tokenizer(tasks, str(tmp_path / "a"), vocab_size=400)  # cache hit
    assert os.path.getmtime(tmp_path / "a" / entries[0] / "tokenizer.json") == mtime
    assert t3.get_vocab() == t1.get_vocab()
    get_tokenizer(tasks, str(tmp_path / "a"), vocab_size=300)  # new key
    get_tokenizer(tasks[:2], str(tmp_path / "a"), vocab_size=400)  # new texts
    assert len(os.listdir(tmp_path / "a")) == 3
    for t in (t1, t3):
        assert (t.pad_token, t.bos_token, t.eos_token) == ("<pad>", "<s>", "</s>")
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
    text = "Task: alpha. Words: lop mar nix. Answer: red"
    assert t1.decode(t1.encode(text, add_special_tokens=False)) == text


def test_label_masking(tok):
    ex = [
        Example("0", "Task: alpha. Words: lop mar nix. Answer:", "red"),
        Example("1", "Task: beta. Words: lop. Answer:", "blue green"),
    ]
    ds = CausalLMExamples(ex, tok, max_len=64)
    b = collate([ds[0], ds[1]], tok.pad_token_id, label_logits_only=False)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i, e in enumerate(ex):
        ids, lab, mask = b["input_ids"][i], b["labels"][i], b["attention_mask"][i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tok.pad_token_id).all() and (lab[n:] == -100).all()
        target = encode_target(tok, e.output)
        assert target[-1] == tok.eos_token_id
        assert lab[n - len(target) : n].tolist() == target  # output + eos
        assert (lab[: n - len(target)] == -100).all()  # prompt masked
        assert ids[0].item() == tok.bos_token_id
        assert tok.decode(ids[n - len(target) : n - 1]) == " " + e.output


def test_prompt_truncation(tok):
    long = "Task: alpha.\n" + " ".join(["lop mar"] * 100) + " end. Answer:"
    full = encode_prompt(tok, long)
    cut = encode_prompt(tok, long, 30)
    head = encode_prompt(tok, "Task: alpha.\n")
    assert len(cut) == 30 and len(full) > 30
    assert cut[: len(head)] == head and cut[len(head) :] == full[-(30 - len(head)) :]
    assert tok.decode(cut).endswith("end. Answer:")
    ds = CausalLMExamples([Example("0", long, "red")], tok, max_len=32)
    assert len(ds[0]["input_ids"]) == 32
    assert ds[0]["labels"][-len(encode_target(tok, "red")) :].tolist() == encode_target(tok, "red")


def test_label_window_loss_equals_full_logits_loss():
    """collate's logits_to_keep window: same loss as full logits, on rows with different prompt and
    label lengths (right padding), and the gathered labels are exactly each row's label tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aim_ds.data.dataset import IGNORE, collate

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    items = []
    for n, lab in [(20, 3), (9, 5), (30, 1), (6, 6)]:
        ids = torch.randint(3, 97, (n,))
        labels = ids.clone()
        labels[: n - lab] = IGNORE
        items.append({"input_ids": ids, "labels": labels})
    full, win = collate(items, 0, label_logits_only=False), collate(items, 0)
    assert win["logits_to_keep"].shape == win["labels"].shape == (4, 6)  # label span 5 + the position before it
    for i, it in enumerate(items):
        kept = win["labels"][i][win["labels"][i] != IGNORE]
        assert kept.tolist() == it["labels"][it["labels"] != IGNORE].tolist()
    with torch.no_grad():
        a, b = model(**full).loss, model(**win).loss
    assert torch.isfinite(a) and abs(float(a) - float(b)) < 1e-5 * float(a)
    # a wrong window (shifted by one) gives a different loss: the check above can fail
    shifted = dict(win, logits_to_keep=(win["logits_to_keep"] + 1).clamp(max=29))
    with torch.no_grad():
        assert abs(float(model(**shifted).loss) - float(a)) > 1e-3


def _tiny_lm_and_rows(seed: int, label_lengths):
    """A 1-layer random Llama and prompt/answer rows of the given (length, answer tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aim_ds.data.dataset import IGNORE

    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    items = []
    for n, lab in label_lengths:
        ids = torch.randint(3, 97, (n,))
        labels = ids.clone()
        labels[: n - lab] = IGNORE
        items.append({"input_ids": ids, "labels": labels})
    return model, items


def test_rows_loss_is_the_models_loss_on_those_rows():
    """aim_ds.rows_loss (the forgetting signal read from a training batch's memory rows) is the model's own
    shifted cross-entropy: all rows give the model's loss, row groups add up, with and without label windows."""
    import pytest

    import aim_ds
    from aim_ds.data.dataset import IGNORE, collate

    model, items = _tiny_lm_and_rows(1, [(12, 2), (7, 3), (15, 1), (9, 4), (11, 2)])
    model.eval()
    for window in (False, True):
        b = collate(items, 0, label_logits_only=window)
        with torch.no_grad():
            out = model(**b)
        s_all, n_all = aim_ds.rows_loss(out.logits, b["labels"], slice(None))
        assert n_all == 2 + 3 + 1 + 4 + 2
        assert s_all / n_all == pytest.approx(float(out.loss), rel=1e-5)
        s_new, n_new = aim_ds.rows_loss(out.logits, b["labels"], slice(0, 3))
        s_mem, n_mem = aim_ds.rows_loss(out.logits, b["labels"], slice(3, None))
        assert (n_new, n_mem) == (6, 6) and s_new + s_mem == pytest.approx(s_all, rel=1e-6)
        # the memory rows' loss is their own: scoring them alone gives the same value
        alone = collate(items[3:], 0, label_logits_only=window)
        with torch.no_grad():
            assert s_mem / n_mem == pytest.approx(float(model(**alone).loss), rel=1e-5)
    assert aim_ds.rows_loss(out.logits, torch.full_like(b["labels"], IGNORE), slice(None)) == (0.0, 0)
    with pytest.raises(ValueError, match="line up"):
        aim_ds.rows_loss(out.logits, collate(items, 0, label_logits_only=False)["labels"], slice(None))


def test_mixed_loss_weights_new_and_memory_rows():
    """aim_ds.mixed_loss: (1 - w) x the new rows' mean token loss + w x the memory rows', built from the same
    cross-entropy as rows_loss (whose memory figures it returns for the probe); its gradient is that mix."""
    import pytest

    import aim_ds
    from aim_ds.data.dataset import IGNORE, collate

    model, items = _tiny_lm_and_rows(2, [(12, 2), (7, 3), (15, 1), (9, 4), (11, 1)])
    for window in (False, True):
        b = collate(items, 0, label_logits_only=window)
        labels = b.pop("labels")
        out = model(**b)
        s_new, n_new = aim_ds.rows_loss(out.logits, labels, slice(0, 3))
        s_mem, n_mem = aim_ds.rows_loss(out.logits, labels, slice(3, None))
        for w in (0.25, 0.5, 0.8):
            loss, ms, mn = aim_ds.mixed_loss(out.logits, labels, 3, w)
            assert (ms, mn) == (pytest.approx(s_mem, rel=1e-6), n_mem) and mn == 5
            assert loss.item() == pytest.approx((1 - w) * s_new / n_new + w * s_mem / n_mem, rel=1e-6)
        # not the plain mean over all tokens (6 new, 5 memory tokens): the weighting is real
        assert abs(aim_ds.mixed_loss(out.logits, labels, 3, 0.5)[0].item() - (s_new + s_mem) / 11) > 1e-4
    # the gradient follows the weights: a memory weight near 0 gives the new rows' gradient alone
    model.zero_grad()
    aim_ds.mixed_loss(model(**b).logits, labels, 3, 1e-9)[0].backward()
    g_mix = model.lm_head.weight.grad.clone()
    model.zero_grad()
    model(**collate(items[:3], 0, label_logits_only=True)).loss.backward()
    assert torch.allclose(g_mix, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)
    no_mem = torch.full_like(labels, IGNORE)
    no_mem[:3] = labels[:3]
    loss, ms, mn = aim_ds.mixed_loss(model(**b).logits, no_mem, 3, 0.5)  # no memory label tokens: that side is 0
    assert (ms, mn) == (0.0, 0) and loss.item() == pytest.approx(0.5 * s_new / n_new, rel=1e-5)
    with pytest.raises(ValueError, match="memory_weight"):
        aim_ds.mixed_loss(out.logits, labels, 3, 1.0)


def test_driver_collate_encodes_each_example_once_and_identically(tok):
    """The driver caches each example's encoding (memory rows recur in every mixed batch): a cached
    batch equals a freshly encoded one, and an example is tokenized once however often it comes back."""

    from aim_ds.data import CausalLMExamples, collate
    from aim_ds.driver import EncodingCache

    exs = load_tasks("default", max_train=12)[1].train
    calls = []

    class Counting:  # the tokenizer, counting encode() calls
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, *a, **k):
            calls.append(1)
            return tok.encode(*a, **k)

    cache = EncodingCache(Counting(), max_len=24, keeps_logits=True)
    first = cache.collate(exs[:8])
    n_first = len(calls)
    again = cache.collate(exs[4:12] + exs[:4])  # 4 new, 8 seen
    assert n_first > 0 and len(calls) == n_first * 3 // 2, (n_first, len(calls))
    ds = CausalLMExamples(exs[4:12] + exs[:4], tok, max_len=24)
    fresh = collate([ds[i] for i in range(len(ds))], tok.pad_token_id, label_logits_only=True)
    assert again.keys() == fresh.keys() and all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert torch.equal(first["input_ids"][4:], again["input_ids"][:4])
