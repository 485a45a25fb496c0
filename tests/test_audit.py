"""audit_schedule, show_batch and the data subcommands (prepare, audit, show-batch)."""
import argparse
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

from fasttrain.data import cli as data_cli
from fasttrain.data.audit import audit_schedule, format_audit_table, format_batch_table, show_batch
from fasttrain.data.dataset import open_dataset
from fasttrain.data.prepare import prepare_dataset
from fasttrain.data.sampler import TrainingStream
from fasttrain.data.schedule import RepetitionSchedule

WORDS = "the a of and to in is was river stone light house garden morning winter letter window".split()


def documents(n=160):
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + f" end{i}." for i in range(n)]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "ds"
    prepare_dataset(out, documents(), vocab_size=300, test_fraction=0.2, progress=False)
    return out


def make_config(path, steps=20, global_batch=16, f=0.25, E=4, placement="uniform", seed=1234):
    return SimpleNamespace(
        data=SimpleNamespace(path=str(path), seq_len=15, repeated_fraction=f, repeat_count=E, placement=placement, seed=seed),
        model=SimpleNamespace(context_length=2048),
        train=SimpleNamespace(steps=steps, global_batch=global_batch),
    )


@pytest.mark.parametrize(
    "S,f,E,placement,chunk",
    [(5000, 0.1, 10, "uniform", 1 << 21), (5000, 0.1, 10, "even", 999), (4000, 0.5, 2, "uniform", 1000),
     (3000, 0.0, 1, "uniform", 512), (2000, 0.9, 300, "even", 333), (2000, 0.2, 20, "uniform", 77),
     (5003, 1.0, 7, "even", 1000), (4000, 1.0, 8, "uniform", 999)],  # f = 1: the whole budget in E epochs
)
def test_audit_passes_on_exact_schedules(S, f, E, placement, chunk):
    schedule = RepetitionSchedule(6000, S, f, E, placement, seed=3, tokens_per_window=16)
    result = audit_schedule(schedule, chunk=chunk)
    assert result["ok"], result["checks"]
    assert result["positions"] == S and result["repeated_positions"] == E * schedule.n_rep
    assert result["realized_fraction"] == pytest.approx(schedule.realized_fraction)
    assert result["distinct_windows_seen"] == schedule.n_rep + schedule.n_unique
    if f == 1.0:  # E passes over S // E windows; the S mod E sequences left over are unique
        assert (schedule.n_rep, schedule.n_unique) == (S // E, S % E)
    if f > 0:
        assert "pass_index_is_chronological" in result["checks"]
        assert len(result["pass_position_range"]) == E
    if placement == "even" and f > 0:
        bounds = [(k * S) // E for k in range(E + 1)]
        for k, (first, last) in enumerate(result["pass_position_range"]):
            assert bounds[k] <= first <= last < bounds[k + 1]
    json.dumps(result)
    assert "AUDIT PASSED" in format_audit_table(result)


class DuplicatingSchedule(RepetitionSchedule):
    """A broken schedule: one unique slot shows a repeated window instead (so it is seen E + 1 times)."""

    victim = -1

    def lookup(self, positions, with_pass=True):
        ids, rep, passes = super().lookup(positions, with_pass)
        ids = ids.copy()
        ids[positions == self.victim] = self.repeated_window_ids()[0]
        return ids, rep, passes


def test_audit_catches_a_broken_schedule():
    schedule = DuplicatingSchedule(6000, 2000, 0.1, 10, "uniform", seed=0)
    _, rep, _ = schedule.lookup(np.arange(2000), with_pass=False)
    schedule.victim = int(np.flatnonzero(~rep)[0])
    result = audit_schedule(schedule)
    assert not result["ok"]
    failed = {name for name, ok in result["checks"].items() if not ok}
    assert {"repeated_windows_seen_exactly_E_times", "unique_windows_seen_exactly_once",
            "repeated_and_unique_disjoint"} <= failed
    assert "AUDIT FAILED" in format_audit_table(result)


def test_show_batch_lists_sequences_tokens_and_text(dataset_dir):
    ds = open_dataset(dataset_dir)
    stream = TrainingStream(ds, 15, 320, 0.25, 4, "even", seed=1)
    result = show_batch(stream, 3, 16)
    assert len(result["sequences"]) == 16
    batch = stream.batch(3, 16).numpy()
    for row, seq in zip(batch, result["sequences"]):
        assert seq["token_ids"] == row.tolist()
        assert seq["text"] == ds.decode(row)
        assert seq["token_offset"] == seq["window_id"] * 16
        assert seq["pass_index"] == (0 if seq["is_repeated"] else -1)  # even: step 3 of 20 is in pass 1 of 4
    assert result["repeated_in_batch"] == sum(s["is_repeated"] for s in result["sequences"]) > 0
    table = format_batch_table(result, text_chars=20)
    assert len(table.splitlines()) == 18 and "1/4" in table
    json.dumps(result)


def _args(**kwargs):
    return argparse.Namespace(**kwargs)


def test_cli_audit_and_show_batch_from_a_config(dataset_dir, tmp_path, capsys, monkeypatch):
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text("# read by the stand-in loader\n")
    seen = {}

    def load_config(path, overrides):
        seen["args"] = (path, overrides)
        return make_config(dataset_dir)

    monkeypatch.setattr(data_cli, "load_config", load_config)

    result = data_cli.run_audit(_args(target=str(tmp_path), json=True), ["--x", "1"])
    assert seen["args"] == (str(cfg_file), ["--x", "1"])  # a run folder resolves to its config.yaml
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["schedule"]["num_sequences"] == 320 == result["positions"]
    assert out["test_split"]["documents"] > 0

    data_cli.run_audit(_args(target=str(cfg_file), json=False))
    assert "AUDIT PASSED" in capsys.readouterr().out

    data_cli.run_show_batch(_args(target=str(cfg_file), step=19, json=True))
    shown = json.loads(capsys.readouterr().out)
    assert shown["step"] == 19 and len(shown["sequences"]) == 16
    data_cli.run_show_batch(_args(target=str(cfg_file), step=0, json=False))
    assert "global batch 0: 16 sequences of 16 tokens" in capsys.readouterr().out

    with pytest.raises(FileNotFoundError, match="config"):
        data_cli.run_audit(_args(target=str(tmp_path / "missing"), json=True))


def test_cli_audit_too_small_dataset(dataset_dir, tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("")
    monkeypatch.setattr(data_cli, "load_config", lambda p, o: make_config(dataset_dir, steps=1000))
    with pytest.raises(ValueError, match="needs .* tokens"):
        data_cli.run_audit(_args(target=str(tmp_path / "c.yaml"), json=True))


def test_cli_prepare_from_jsonl(tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(80)))
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "prepared"
    args = parser.parse_args(["prepare", "--input", str(source), "--out", str(out), "--vocab-size", "280",
                              "--test-fraction", "0.1", "--seed", "5", "--quiet"])
    args.func(args)
    ds = open_dataset(out)
    assert ds.vocab_size == 280 and ds.manifest["prepare"]["seed"] == 5
    assert ds.manifest["prepare"]["documents_seen"] == 80
    assert str(out) in capsys.readouterr().out
    # --max-bytes keeps a prefix of the documents.
    args = parser.parse_args(["prepare", "--input", str(source), "--out", str(tmp_path / "small"),
                              "--vocab-size", "280", "--max-bytes", "2000", "--quiet"])
    args.func(args)
    small = open_dataset(tmp_path / "small").manifest["prepare"]
    assert small["input_bytes"] <= 2000 and small["documents_seen"] < 80
    with pytest.raises(FileExistsError):
        args.func(args)


def test_fasttrain_command_line_runs_audit(dataset_dir, tmp_path, capsys):
    # End to end through the main `fasttrain` entry point and its config loader.
    from fasttrain.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"model: {{preset: 100k}}\n"
        f"data: {{path: '{dataset_dir}', seq_len: 15, repeated_fraction: 0.25, repeat_count: 4, placement: even}}\n"
        f"train: {{steps: 20, global_batch: 16}}\noptim: {{warmup_steps: 2}}\n"
    )
    assert main(["audit", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["schedule"]["placement"] == "even"
    assert main(["show-batch", str(cfg), "--step", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sequences"]) == 16
    assert main(["audit", str(cfg), "--data.repeat_count", "8"]) == 0
    assert "E=8" in capsys.readouterr().out


def test_show_batch_outside_the_run_is_one_error_line(dataset_dir, tmp_path, capsys):
    from fasttrain.cli import main

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: {{preset: 100k}}\ndata: {{path: '{dataset_dir}', seq_len: 15}}\n"
                   f"train: {{steps: 30, global_batch: 4}}\noptim: {{warmup_steps: 2}}\n")
    for step in (99, 30, -1):
        assert main(["show-batch", str(cfg), "--step", str(step)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == f"error: --step {step} is outside this run: it has 30 steps, so give a step from 0 to 29\n"
    assert main(["show-batch", str(cfg), "--step", "29"]) == 0
    assert "global batch 29: 4 sequences" in capsys.readouterr().out
