"""evaluate_task on tiny random Llama models in one process (no DeepSpeed), and cl_metrics."""

import json
from pathlib import Path

import pytest
import torch

from aim_ds.data import CausalLMExamples, Task, collate, encode_prompt, get_tokenizer, load_tasks
from aim_ds.experiment.evaluation import cl_metrics, evaluate_task, generate_texts, rouge_l, score_labels


# ---------------------------------------------------------------- cl_metrics
def test_cl_metrics_hand_computed():
    m = [[80.0, 10.0, 5.0], [60.0, 70.0, 20.0], [40.0, 50.0, 90.0]]
    r = cl_metrics(m, [75.0, 80.0, 85.0])
    assert r["OP"] == pytest.approx((40 + 50 + 90) / 3)
    assert r["BWT"] == pytest.approx(((40 - 80) + (50 - 70)) / 2)  # -30
    assert r["FWT"] == pytest.approx(((80 - 75) + (70 - 80) + (90 - 85)) / 3)  # 0
    assert cl_metrics(m, None)["FWT"] is None
    lower = [[80.0], [60.0, 70.0], [40.0, 50.0, 90.0]]  # triangular rows are fine
    assert cl_metrics(lower, None) == cl_metrics(m, None)


def test_cl_metrics_single_task_and_errors():
    assert cl_metrics([[42.0]], None) == {"OP": 42.0, "BWT": 0.0, "FWT": None}
    assert cl_metrics([[42.0]], [40.0])["FWT"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        cl_metrics([], None)
    with pytest.raises(ValueError):
        cl_metrics([[1.0], [2.0]], None)
    with pytest.raises(ValueError):
        cl_metrics([[1.0, 0.0], [2.0, 3.0]], [1.0])


def test_rouge_l():
    assert rouge_l("Lop Mar Nix ", "lop mar nix") == pytest.approx(1.0)
    assert rouge_l("nix mar lop", "lop mar nix") == pytest.approx(1 / 3)
    assert rouge_l("", "lop") == 0.0


# ---------------------------------------------------------------- tiny models
def _model(vocab, seed=0, hidden=64):
    from transformers import LlamaForCausalLM

    from aim_ds.experiment.modeling import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def _train(model, tok, examples, steps, lr=3e-3, bs=16, seed=0):
    ds = CausalLMExamples(examples, tok, max_len=48)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(ds), (bs,), generator=g).tolist()
        loss = model(**collate([ds[i] for i in idx], tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    cls = load_tasks("default", max_train=320, max_eval=48)
    gen = load_tasks("default-gen", max_train=320, max_eval=16)
    tok = get_tokenizer(cls + gen, str(tmp_path_factory.mktemp("tok")), vocab_size=512)
    return cls, gen, tok


def test_classification_scores_and_mode(setup):
    cls, _, tok = setup
    model = _model(len(tok))
    model.train()
    s = evaluate_task(model, tok, cls[0], batch_size=50)
    assert 0.0 <= s <= 100.0 and model.training  # previous mode restored
    model.eval()
    assert evaluate_task(model, tok, cls[0], batch_size=7) == pytest.approx(s)  # batching-invariant
    assert not model.training


def test_classification_learned_beats_chance(setup):
    cls, _, tok = setup
    model = _model(len(tok))
    _train(model, tok, cls[0].train, steps=60)
    s = evaluate_task(model, tok, cls[0], batch_size=64)
    assert s >= 60.0, f"after 60 steps on a trivial task the score is {s} (chance 25)"


def test_score_labels_matches_full_sequence_loss(setup):
    cls, _, tok = setup
    model = _model(len(tok)).eval()
    ex = cls[1].eval[0]
    p = encode_prompt(tok, ex.input)
    labels = [tok.encode(" " + l, add_special_tokens=False) + [tok.eos_token_id] for l in cls[1].labels]
    s = score_labels(model, tok, [p], labels, batch_size=3)
    for j, l in enumerate(labels):
        ids = torch.tensor([p + l])
        lab = torch.tensor([[-100] * len(p) + l])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=lab).loss.item()
        assert s[0, j].item() == pytest.approx(-loss * len(l), rel=1e-4, abs=1e-4)


def test_generation_rouge(setup):
    _, gen, tok = setup
    copy = gen[0]  # echo: the last word twice, learnable in a few dozen steps
    assert copy.name == "echo" and copy.metric == "rougeL"
    model = _model(len(tok), hidden=64)
    s0 = evaluate_task(model, tok, copy, batch_size=8, max_new_tokens=8)
    assert 0.0 <= s0 <= 100.0
    _train(model, tok, copy.train, steps=60, lr=3e-3)
    s1 = evaluate_task(model, tok, copy, batch_size=8, max_new_tokens=8)
    assert 0.0 <= s1 <= 100.0 and s1 > s0 + 20, (s0, s1)
    # left-padded batched greedy generation equals one-at-a-time generation
    prompts = [encode_prompt(tok, e.input) for e in copy.eval[:4]]
    prompts[1] = prompts[1][:-2]  # uneven lengths -> left padding
    batched = generate_texts(model, tok, prompts, batch_size=4, max_new_tokens=6)
    single = [generate_texts(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_exact_generation_path_and_rank_slices(setup):
    cls, gen, tok = setup
    model = _model(len(tok))
    t = Task("g", gen[0].train, gen[0].eval[:5], "exact", None)  # exact match by generation
    assert evaluate_task(model, tok, t, batch_size=2, max_new_tokens=4) in (0.0, 20.0, 40.0, 60.0, 80.0, 100.0)
    with pytest.raises(ValueError):
        evaluate_task(model, tok, t, batch_size=2, rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="not initialised"):
        evaluate_task(model, tok, cls[0], batch_size=2, rank=0, world_size=2)


# ---------------------------------------------------------------- two ranks (gloo, no DeepSpeed)
def _worker(rank, world, port, tok_dir, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cls = load_tasks("default", max_train=320, max_eval=13)  # 13: uneven slices 7 / 6
        gen = load_tasks("default-gen", max_train=320, max_eval=5)  # 5: 3 / 2
        tok = get_tokenizer(cls + gen, tok_dir, vocab_size=512)
        model = _model(len(tok), seed=1)
        s_cls = evaluate_task(model, tok, cls[1], batch_size=5, rank=rank, world_size=world)
        s_gen = evaluate_task(model, tok, gen[1], batch_size=2, rank=rank, world_size=world, max_new_tokens=5)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps([s_cls, s_gen]))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tok_dir = str(tmp_path / "tok")
    # fork: the children inherit the imported modules (spawn would re-import transformers)
    mp.start_processes(_worker, args=(2, port, tok_dir, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    cls = load_tasks("default", max_train=320, max_eval=13)
    gen = load_tasks("default-gen", max_train=320, max_eval=5)
    tok = get_tokenizer(cls + gen, tok_dir, vocab_size=512)
    model = _model(len(tok), seed=1)
    ref = (
        evaluate_task(model, tok, cls[1], batch_size=5),
        evaluate_task(model, tok, gen[1], batch_size=2, max_new_tokens=5),
    )
    assert out[0] == out[1]
    assert out[0][0] == pytest.approx(ref[0]) and out[0][1] == pytest.approx(ref[1])
