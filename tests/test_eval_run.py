"""Evaluations on a tiny prepared dataset: test loss against an independent computation, memorization,
checkpoint loading and its errors, and the `eval` command."""
import argparse
import json
import os
import random
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasttrain.config import config_from_dict
from fasttrain.data import MissingSplitError, open_dataset, prepare_dataset
from fasttrain.eval.cli import register
from fasttrain.checkpoint import CheckpointError, load_checkpoint, load_model
from fasttrain.eval.copying import copying_scores
from fasttrain.eval.icl import icl_score
from fasttrain.eval.run import evaluate
from fasttrain.measure.loss import heldout_loss, seen_unique_positions, training_schedule
from fasttrain.measure.stats import mean_and_stderr
from fasttrain.measure.windows import window_documents
from fasttrain.model import GPT
from fasttrain.checkpoint.files import save_checkpoint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def documents(n=150, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(150)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) + "." for _ in range(n)]


def make_config(data_path, **model):
    return config_from_dict({
        "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context_length": 128, **model},
        "data": {"path": data_path, "repeated_fraction": 0.25, "repeat_count": 4},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 10, "global_batch": 4, "eval_tokens": 512, "precision": "fp32"},
    })


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "data")
    prepare_dataset(data, documents(), vocab_size=300, test_fraction=0.2, seed=0, progress=False)
    dataset = open_dataset(data)
    cfg = make_config(data)
    torch.manual_seed(0)
    model = GPT.from_config(cfg.model, dataset.vocab_size).to(DEVICE).eval()
    run = str(root / "run")
    os.makedirs(run)
    cfg.save(os.path.join(run, "config.yaml"))
    for step in (5, 10):
        save_checkpoint(run, step, {"model": model.state_dict(), "optimizer": {}, "step": step, "rng": {},
                                    "config": cfg.to_dict(), "vocab_size": dataset.vocab_size})
    return {"root": root, "data": data, "dataset": dataset, "cfg": cfg, "model": model, "run": run}


def independent_loss(model, dataset, window_ids, seq_len):
    tokens = np.asarray(dataset.test.tokens).astype(np.int64)
    nats, count, n_bytes, per_window = 0.0, 0, 0, []
    for w in window_ids:
        window = torch.from_numpy(tokens[w * (seq_len + 1):(w + 1) * (seq_len + 1)]).to(DEVICE)
        logits = model(window[None, :-1])[0].float()
        window_nats = -F.log_softmax(logits, dim=-1).gather(1, window[1:, None]).sum().item()
        nats += window_nats
        per_window.append(window_nats / seq_len)
        count += seq_len
        n_bytes += len(dataset.tokenizer.decode(window[1:].tolist()).encode("utf-8"))
    documents = document_of_token(dataset)[np.asarray(window_ids) * (seq_len + 1) + seq_len // 2]
    stderr = clustered_stderr(per_window, documents) if len(set(documents)) > 1 else None
    return nats / count, nats / np.log(2) / n_bytes, count, stderr


def document_of_token(dataset):
    """The document of every token of the test split (prepare writes one sequence per document)."""
    sizes = np.asarray(dataset.test.sizes)
    return np.repeat(np.arange(len(sizes)), sizes)


def clustered_stderr(values, groups):
    """The cluster-robust standard error of a mean, written out with a loop over groups."""
    values = np.asarray(values, dtype=np.float64)
    mean, by_group = values.mean(), {}
    for v, g in zip(values, groups):
        by_group[g] = by_group.get(g, 0.0) + (v - mean)
    G = len(by_group)
    return np.sqrt(G / (G - 1) * sum(d * d for d in by_group.values())) / len(values)


def test_mean_and_stderr_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=40)
    mean, se = mean_and_stderr(x)
    assert mean == pytest.approx(np.mean(x)) and se == pytest.approx(np.std(x, ddof=1) / np.sqrt(40))
    assert mean_and_stderr(x, groups=np.arange(40))[1] == pytest.approx(se)  # every value its own group
    # Equal groups of 4: the error over groups is that of the 10 group means taken as independent values.
    groups = np.repeat(np.arange(10), 4)
    group_means = x.reshape(10, 4).mean(axis=1)
    assert mean_and_stderr(x, groups)[1] == pytest.approx(np.std(group_means, ddof=1) / np.sqrt(10))
    uneven = rng.integers(0, 7, size=40)
    assert mean_and_stderr(x, uneven)[1] == pytest.approx(clustered_stderr(x, uneven))
    assert mean_and_stderr([1.5]) == (1.5, None) and mean_and_stderr(x, np.zeros(40))[1] is None
    with pytest.raises(ValueError, match="group labels"):
        mean_and_stderr(x, np.zeros(3))


def test_window_documents_follow_doc_idx():
    # Sequences of 5, 0, 7, 4 and 9 tokens (uint16); documents = sequences [0, 1], [2], [3, 4] per doc_idx.
    sizes = np.array([5, 0, 7, 4, 9], dtype=np.int32)
    split = types.SimpleNamespace(sizes=sizes, dtype=np.dtype(np.uint16), doc_idx=np.array([0, 2, 3, 5]),
                                  pointers=2 * np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    dataset = types.SimpleNamespace(test=split)
    # windows of 3 tokens (seq_len 2): middle tokens 1, 4, 7, 10, 13, 16, 19, 22
    assert window_documents(dataset, "test", range(8), 2).tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    split.doc_idx = np.array([0])  # no document ends recorded: each sequence is its own document
    assert window_documents(dataset, "test", range(8), 2).tolist() == [0, 0, 2, 2, 3, 4, 4, 4]


def test_test_loss_equals_independent_computation(setup):
    model, dataset = setup["model"], setup["dataset"]
    n_windows = len(dataset.test.tokens) // 129
    everything = heldout_loss(model, dataset, 128, max_tokens=10**9, batch_size=7, device=DEVICE)
    loss, bpb, count, stderr = independent_loss(model, dataset, range(n_windows), 128)
    assert everything["test_tokens"] == count == n_windows * 128
    assert everything["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert everything["test_bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    # The standard error: per-window losses, grouped by the document of each window's middle token.
    assert everything["test_loss_stderr"] == pytest.approx(stderr, rel=1e-4) and 0 < stderr < 0.5
    # A budget of 3 windows: the first, the middle and the last one of the split.
    few = heldout_loss(model, dataset, 128, max_tokens=3 * 128, batch_size=2, device=DEVICE)
    loss, bpb, count, stderr = independent_loss(model, dataset, [0, (n_windows - 1 + 1) // 2, n_windows - 1], 128)
    assert few["test_tokens"] == count and few["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert few["test_bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert few["test_loss_stderr"] == pytest.approx(stderr, rel=1e-4)


def test_icl_score_equals_independent_computation(setup):
    """Loss of each window's last token after 127 tokens minus after 49, from plain cross-entropies."""
    model, dataset = setup["model"], setup["dataset"]
    tokens = np.asarray(dataset.test.tokens).astype(np.int64)
    available = len(tokens) // 128
    result = icl_score(model, dataset, 128, tokens=20 * 178, batch_size=5, device=DEVICE)
    assert result["icl_sequences"] == 20 and result["icl_positions"] == [50, 128]
    ids = [int(np.floor(k * (available - 1) / 19 + 0.5)) for k in range(20)]

    def last_token_loss(context):
        x = torch.from_numpy(context).to(DEVICE)
        return F.cross_entropy(model(x[None, :-1])[0, -1].float(), x[-1]).item()

    late = [last_token_loss(tokens[w * 128:(w + 1) * 128]) for w in ids]
    early = [last_token_loss(tokens[(w + 1) * 128 - 50:(w + 1) * 128]) for w in ids]
    diff = np.array(late) - np.array(early)
    assert result["icl_score"] == pytest.approx(diff.mean(), abs=1e-5)
    assert result["icl_loss_late"] == pytest.approx(np.mean(late), rel=1e-5)
    documents = document_of_token(dataset)[np.array(ids) * 128 + 63]
    assert result["icl_score_stderr"] == pytest.approx(clustered_stderr(diff, documents), rel=1e-4)
    assert icl_score(model, dataset, 128, tokens=100)["icl_sequences"] == 16  # at least 16 contexts
    assert icl_score(model, dataset, 128, tokens=10**9)["icl_sequences"] == available


def test_copying_equals_independent_computation(setup):
    """C = 5 copies of 25-token passages: losses of every copy from plain cross-entropies."""
    model, dataset = setup["model"], setup["dataset"]
    tokens = np.asarray(dataset.test.tokens).astype(np.int64)
    r = copying_scores(model, dataset, 128, copies=5, tokens=3 * 126, batch_size=2, device=DEVICE)
    assert (r["copy_copies"], r["copy_length"], r["copy_sequences"]) == (5, 25, 4)  # (128 - 1) // 5; at least 4
    available = len(tokens) // 25
    ids = [int(np.floor(k * (available - 1) / 3 + 0.5)) for k in range(4)]
    per_copy = []
    for w in ids:
        seq = torch.from_numpy(np.concatenate([[dataset.eot_id]] + [tokens[w * 25:(w + 1) * 25]] * 5)).to(DEVICE)
        nll = F.cross_entropy(model(seq[None, :-1])[0].float(), seq[1:], reduction="none")  # nll[t]: token t + 1
        per_copy.append([nll[c * 25 + 1:(c + 1) * 25].mean().item() for c in range(5)])  # tokens 1..24 of copy c
    per_copy = np.array(per_copy)
    passage = per_copy[:, 1:].mean(axis=1)  # copies 2..5
    assert r["copy_text_loss"] == pytest.approx(passage.mean(), rel=1e-5)
    assert r["copy_text_first_loss"] == pytest.approx(per_copy[:, 0].mean(), rel=1e-5)
    assert r["copy_text_second_loss"] == pytest.approx(per_copy[:, 1].mean(), rel=1e-5)
    documents = document_of_token(dataset)[np.array(ids) * 25 + 12]
    assert r["copy_text_loss_stderr"] == pytest.approx(clustered_stderr(passage, documents), rel=1e-4)
    assert r["copy_random_first_loss"] > 5.0 and r["copy_random_loss_stderr"] > 0


def test_icl_score_over_the_whole_split_equals_independent_computation(setup):
    # "Loss at token k" predicts the k-th token of a context from the k - 1 before it. Each context's last
    # token is predicted twice: after the whole context (loss at late) and after only its last `early`
    # tokens (loss at early); the score is the mean of the differences. A budget this large takes every
    # test window as a context.
    model, dataset, cfg = setup["model"], setup["dataset"], setup["cfg"]
    tokens = np.asarray(dataset.test.tokens).astype(np.int64)
    for requested, (early, late) in [(None, (50, 128)), ((10, 100), (10, 100))]:
        result = evaluate(model, dataset, cfg, metrics=["icl"], tokens=10**6, icl_positions=requested)
        assert result["icl_positions"] == [early, late]
        n_contexts = len(tokens) // late
        assert result["icl_sequences"] == n_contexts
        contexts = torch.from_numpy(tokens[:n_contexts * late].reshape(n_contexts, late)).to(DEVICE)
        with torch.no_grad():
            late_logits = model(contexts[:, :-1])[:, -1].double()
            early_logits = model(contexts[:, late - early:-1])[:, -1].double()
        loss_late = F.cross_entropy(late_logits, contexts[:, -1], reduction="none").cpu().numpy()
        loss_early = F.cross_entropy(early_logits, contexts[:, -1], reduction="none").cpu().numpy()
        diff = loss_late - loss_early
        assert result["icl_loss_early"] == pytest.approx(loss_early.mean(), rel=1e-6)
        assert result["icl_loss_late"] == pytest.approx(loss_late.mean(), rel=1e-6)
        assert result["icl_score"] == pytest.approx(diff.mean(), abs=1e-6)
        documents = document_of_token(dataset)[np.arange(n_contexts) * late + (late - 1) // 2]
        assert result["icl_score_stderr"] == pytest.approx(clustered_stderr(diff, documents), rel=1e-4)


def test_evaluate_reports_every_metric_deterministically(setup):
    model, dataset, cfg = setup["model"], setup["dataset"], setup["cfg"]
    first = evaluate(model, dataset, cfg, tokens=512, step=5)
    second = evaluate(model, dataset, cfg, tokens=512, step=5)
    first.pop("eval_seconds"), second.pop("eval_seconds")
    assert first == second
    assert "skipped" not in first
    assert first["test_tokens"] == 512 and 4.5 < first["test_loss"] < 7.0  # ~ln(300) at init
    assert first["copy_length"] == 11 and first["copy_copies"] == 11 and first["icl_positions"] == [50, 128]
    assert np.array(first["induction_scores"]).shape == (2, 2) and first["induction_sequences"] == 10
    assert first["induction_score_max"] == max(first["induction_score_per_layer"])
    assert np.array(first["copying_head_scores"]).shape == np.array(first["previous_token_scores"]).shape == (2, 2)
    assert first["previous_token_windows"] == 4  # 512 tokens: 4 windows of 128
    for key in ("test_loss", "repeated_loss", "seen_unique_loss", "copy_text_loss", "copy_random_loss",
                "induction_score_max", "icl_score"):
        assert first[key + "_stderr"] > 0, key
    # Repeated windows seen by step 5 (20 of 40 sequences), counted independently from the schedule.
    schedule = training_schedule(dataset, cfg)
    seen = schedule.window_ids(np.arange(20))
    expected = np.mean([(seen == w).sum() for w in schedule.repeated_window_ids()])
    assert first["repeated_times_seen"] == pytest.approx(expected)
    assert evaluate(model, dataset, cfg, metrics="repeated", tokens=512)["repeated_times_seen"] == 4.0
    at_start = evaluate(model, dataset, cfg, metrics=None, tokens=128, step=0)
    assert "seen_unique_loss" not in at_start and "seen" in at_start["skipped"]


def test_seen_unique_positions_are_trained_unique_and_spread(setup):
    schedule = training_schedule(setup["dataset"], setup["cfg"])
    positions = seen_unique_positions(schedule, trained_sequences=24, n=6)
    assert len(positions) == 6 and len(set(positions.tolist())) == 6
    assert positions.max() < 24
    _, repeated, _ = schedule.lookup(positions)
    assert not repeated.any()
    assert len(seen_unique_positions(schedule, 24, n=1000)) == 24 - (schedule.window_ids(np.arange(24))[:, None]
                                                                     == schedule.repeated_window_ids()).any(1).sum()


def test_repeated_loss_shows_memorization(setup):
    """After fitting the repeated windows only, their loss falls far below the loss of unseen data."""
    dataset, cfg = setup["dataset"], setup["cfg"]
    schedule = training_schedule(dataset, cfg)
    from fasttrain.measure.windows import read_windows

    windows = torch.from_numpy(read_windows(dataset, "train", schedule.repeated_window_ids(), 128)).to(DEVICE)
    torch.manual_seed(1)
    model = GPT.from_config(cfg.model, dataset.vocab_size).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(80):
        loss = model(windows[:, :-1], windows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = evaluate(model, dataset, cfg, metrics="test,repeated,seen", tokens=512)
    assert r["repeated_loss"] < 0.5 * r["seen_unique_loss"]
    assert r["repeated_loss"] < 0.5 * r["test_loss"]


def test_load_model_from_run_folder_and_file(setup):
    model, cfg = load_model(setup["run"])
    assert cfg.to_dict() == setup["cfg"].to_dict()
    loaded = load_checkpoint(setup["run"])
    assert loaded.step == 10 and loaded.path.endswith("step_0000010.pt")
    x = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        assert torch.equal(model(x), setup["model"].cpu()(x))
    setup["model"].to(DEVICE)
    assert load_checkpoint(os.path.join(setup["run"], "checkpoints", "step_0000005.pt")).step == 5


def test_raw_and_wrapped_state_dicts_and_a_damaged_newest_checkpoint(setup, tmp_path):
    state = {"module." + k: v for k, v in setup["model"].state_dict().items()}  # as a DeepSpeed engine names them
    torch.save(state, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="holds no config"):
        load_model(str(tmp_path / "raw.pt"))
    loaded = load_checkpoint(str(tmp_path / "raw.pt"), config=setup["run"])
    assert loaded.step is None and next(loaded.model.parameters()).requires_grad
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    (run / "checkpoints" / "step_0000010.pt").write_bytes(b"cut short")
    assert load_checkpoint(str(run)).step == 5  # the newest readable one


def test_bad_checkpoints_are_clear_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        load_model(str(broken))
    other = make_config(setup["data"], d_model=48, n_head=3)  # another config: shapes differ
    with pytest.raises(CheckpointError, match="trained with model.d_model=32"):
        load_checkpoint(setup["run"], config=other)
    # A checkpoint whose embedded config is another model's: the shapes name the problem.
    ckpt = torch.load(os.path.join(setup["run"], "checkpoints", "step_0000010.pt"), weights_only=True)
    ckpt["config"] = other.to_dict()
    torch.save(ckpt, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"does not match the config .*d_model=48.*wte.weight has shape"):
        load_model(str(tmp_path / "mixed.pt"))
    with pytest.raises(CheckpointError, match="model.n_head=2"):  # same shapes, other heads
        load_checkpoint(setup["run"], config=make_config(setup["data"], n_head=4))


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    model, dataset, cfg = setup["model"], setup["dataset"], setup["cfg"]
    no_test = str(tmp_path / "no_test")
    prepare_dataset(no_test, documents(60), vocab_size=300, test_fraction=0.0, seed=0, progress=False)
    with pytest.raises(MissingSplitError, match="'test' split"):
        evaluate(model, open_dataset(no_test), cfg, metrics="test")
    short_cfg = make_config(setup["data"], context_length=64)
    short = GPT.from_config(short_cfg.model, dataset.vocab_size).to(DEVICE)
    with pytest.raises(ValueError, match=r"trained context \(64 tokens\) is shorter"):
        evaluate(short, dataset, short_cfg, metrics="induction")
    assert "induction" in evaluate(short, dataset, short_cfg, metrics=None, tokens=64)["skipped"]
    with pytest.raises(ValueError, match="beyond the context of 128"):
        evaluate(model, dataset, cfg, metrics="icl", icl_positions=(50, 500))
    with pytest.raises(ValueError, match="at most 63"):
        evaluate(model, dataset, cfg, metrics="copying", copy_length=100, copies=2)
    with pytest.raises(ValueError, match="unknown metric 'tset'"):
        evaluate(model, dataset, cfg, metrics="tset")
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(model, dataset, cfg, metrics="test", copies=1)
    with pytest.raises(ValueError, match="use fewer copies"):
        evaluate(model, dataset, cfg, metrics="copying", copies=100)  # passages of (128 - 1) // 100 = 1 token


def run_cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_eval_command_writes_one_document_per_checkpoint(setup, tmp_path, capsys):
    run_cli(["eval", setup["run"], "--tokens", "256", "--metrics", "test,copying,induction,heads", "--device", "cpu",
             "--copies", "3"])
    path = os.path.join(setup["run"], "checkpoints", "eval_step_0000010.json")
    doc = json.load(open(path))
    assert doc["step"] == 10 and doc["tokens_seen"] == 10 * 4 * 128 and doc["eval"]["copies"] == 3
    assert set(doc["results"]) >= {"test_loss", "test_loss_stderr", "copy_text_loss", "copy_text_second_loss",
                                   "induction_scores", "copying_head_scores", "previous_token_scores"}
    assert doc["results"]["copy_copies"] == 3 and doc["results"]["copy_length"] == 42
    table = capsys.readouterr().out
    assert "test loss" in table and "induction (prefix matching)" in table and path in table
    assert "copying, text (C=3, L=42)" in table and "previous-token score" in table and table.count(" +- ") >= 4
    run_cli(["eval", setup["run"], "--all", "--tokens", "128", "--metrics", "test", "--json", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path / "out")) == ["eval_step_0000005.json", "eval_step_0000010.json"]


def test_eval_command_takes_several_runs(setup, tmp_path, capsys):
    # Two run folders in one process, each document written where {run} says.
    other = str(tmp_path / "other")
    shutil.copytree(setup["run"], other)
    shutil.rmtree(os.path.join(other, "checkpoints"))
    model = GPT.from_config(setup["cfg"].model, setup["dataset"].vocab_size)  # other weights: another result
    save_checkpoint(other, 7, {"model": model.state_dict(), "optimizer": {}, "step": 7, "rng": {},
                               "config": setup["cfg"].to_dict(), "vocab_size": setup["dataset"].vocab_size})
    with pytest.raises(ValueError, match=r"\{run\}"):
        run_cli(["eval", setup["run"], other, "--json", str(tmp_path / "one.json")])
    run_cli(["eval", setup["run"], other + "/", "--tokens", "256", "--metrics", "test", "--device", "cpu",
             "--json", "{run}/eval.json"])
    docs = [json.load(open(os.path.join(d, "eval.json"))) for d in (setup["run"], other)]
    assert [d["step"] for d in docs] == [10, 7]
    assert docs[0]["results"]["test_loss"] != docs[1]["results"]["test_loss"]
    single = str(tmp_path / "single.json")
    run_cli(["eval", other, "--tokens", "256", "--metrics", "test", "--device", "cpu", "--json", single])
    assert json.load(open(single))["results"]["test_loss"] == docs[1]["results"]["test_loss"]


@pytest.mark.parametrize("argv, message", [
    (["--copies", "1"], "copies 1: copying needs a passage placed at least 2 times"),
    (["--tokens", "0"], "--tokens 0: the evaluation token budget must be at least 1"),
])
def test_eval_command_bad_options_are_one_line_errors(setup, capsys, argv, message):
    from fasttrain.cli import main

    assert main(["eval", setup["run"], *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
