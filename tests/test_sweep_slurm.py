"""Sweeps on a real Slurm: a one-node cluster (slurmctld, slurmd, munged from Debian's packages) started once
for the whole test run, without accounting. Runs train on the CPU (1 core per job, 2 jobs at once on 2 cores)."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from fasttrain.sweep import slurm
from fasttrain.sweep.cli import main as sweep_main
from fasttrain.sweep.grid import SweepError, spec_from_dict
from fasttrain.sweep.runner import run_sweep
from slurm_cluster import missing_commands, one_node_cluster
from test_sweep_pack import read_manifest as entries, write_sweep
from test_sweep_resume import wait_for

STEPS = 200
RUNS = ("100k_f0_s0", "100k_f0.1_E2_uniform_s0")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = missing_commands()
    if missing:
        pytest.skip(f"Slurm packages absent ({', '.join(missing)} not found): apt-get install slurm-wlm munge "
                    "(.ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster needs root (slurmd starts jobs as their users)")
    with one_node_cluster(str(tmp_path_factory.mktemp("slurm") / "cluster")) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same arithmetic here and in the jobs, which inherit it
    monkeypatch.setattr(slurm, "WAIT_POLL_S", 0.5)


def sweep_tree(out_dir, data_path, slurm_settings=None, **changes):
    tree = {
        "out_dir": str(out_dir),
        "base": {"model": {"context_length": 16}, "data": {"path": data_path, "seq_len": 16},
                 "optim": {"lr": 3e-3, "warmup_steps": 5},
                 "train": {"global_batch": 4, "log_every": 10, "checkpoint_every": 50, "eval_tokens": 256,
                           "device": "cpu", "precision": "fp32"}},
        "grid": {"sizes": ["100k"], "repeated_fraction": [0.1], "repeat_count": [2]},
        "budget": {"steps": STEPS},
    }
    if slurm_settings is not None:
        tree["executor"] = {"slurm": {"cpus_per_gpu": 1, **slurm_settings}}
    tree.update(changes)
    return tree


def logged(run_dir):
    """(step, loss) of every logged step, and the final test loss."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "final.json")) as f:
        final = json.load(f)["test_loss"]
    return [(r["step"], r["loss"]) for r in records if "loss" in r], final


def last_step(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


@pytest.fixture(scope="module")
def local_reference(dataset_dir, tmp_path_factory):
    """The same runs trained by the local runner."""
    sweep_dir = tmp_path_factory.mktemp("local") / "sweep"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        result = run_sweep(spec_from_dict(sweep_tree(sweep_dir, dataset_dir)), progress=False)
    assert sorted(result.done) == sorted(RUNS)
    return {name: logged(os.path.join(sweep_dir, "runs", name)) for name in RUNS}


def test_slurm_sweep_gives_the_local_runners_results(slurm_cluster, tmp_path, dataset_dir, local_reference, capsys):
    sweep_dir = tmp_path / "sweep"
    sweep_file = write_sweep(tmp_path / "sweep.yaml", sweep_tree(sweep_dir, dataset_dir, {}))
    assert sweep_main(["sweep", sweep_file, "--dry-run", "--no-measure"]) == 0
    assert ("on Slurm (the default partition): 2 jobs, each 1 node x 1 process(es) with 0 GPU(s) per node"
            in capsys.readouterr().out)
    assert sweep_main(["sweep", sweep_file, "--wait"]) == 0
    out = capsys.readouterr().out
    runs = entries(sweep_dir)
    array = runs[RUNS[0]]["jobs"][0].split("_")[0]
    assert [runs[name]["jobs"] for name in RUNS] == [[f"{array}_0"], [f"{array}_1"]]  # one job array
    for name in RUNS:
        assert f"{name}: submitted as job {array}_" in out and f"{name}: done, test loss" in out
        assert logged(sweep_dir / "runs" / name) == local_reference[name]  # every logged loss, bit for bit
        entry = runs[name]
        assert (entry["state"], entry["attempts"], entry["job_id"], entry["executor"]) == ("done", 1, None, "slurm")
        assert entry["final"]["test_loss"] == local_reference[name][1]
        record = json.loads((sweep_dir / "runs" / name / "job.json").read_text())
        assert record["returncode"] == 0 and record["host"] == slurm_cluster.host and record["restarts"] == 0
    assert "2 of 2 runs done, 0 queued or running on Slurm" in out
    # the job's settings reached sbatch: one core per task, USR1 before the time limit, requeueable
    script = (sweep_dir / "slurm" / f"{array}_submission.sh").read_text()
    assert all(line in script for line in ("#SBATCH --cpus-per-task=1", "#SBATCH --signal=USR1@120",
                                           "#SBATCH --requeue", "#SBATCH --array=0-1%2"))
    assert "--time" not in script and "gpus" not in script  # the partition's limit; CPU-only jobs

    # re-running reconciles and submits nothing; --status says where everything stands
    assert sweep_main(["sweep", sweep_file]) == 0
    assert "submitted" not in capsys.readouterr().out and slurm_cluster.queue() == {}
    assert sweep_main(["sweep", sweep_file, "--status"]) == 0
    status = capsys.readouterr().out
    for i, name in enumerate(RUNS):
        assert re.search(rf"^{re.escape(name)} +done +{array}_{i} +1 +{STEPS}/{STEPS}$", status, re.M), status


def test_lost_job_is_resubmitted_within_its_retries(slurm_cluster, tmp_path, dataset_dir, capsys):
    sweep_dir = tmp_path / "sweep"
    tree = sweep_tree(sweep_dir, dataset_dir, {"retries": 1, "sbatch": {"hold": True}},
                      grid={"sizes": ["100k"], "repeated_fraction": [0.0]}, budget={"steps": 20}, evaluate=["test"])
    held = write_sweep(tmp_path / "held.yaml", tree)
    name = "100k_f0_s0"

    def job_id():
        return entries(sweep_dir)[name]["job_id"]

    assert sweep_main(["sweep", held]) == 0
    first = job_id()
    assert slurm_cluster.queue() == {first: "PENDING"}
    assert sweep_main(["sweep", held, "--status"]) == 0
    assert re.search(rf"^{name} +queued +{first} +1 +0/20 +\(JobHeldUser\)$", capsys.readouterr().out, re.M)
    # nor is it run here meanwhile
    with pytest.raises(SweepError, match=rf"run {name} is on Slurm as job {first} \(PENDING\)"):
        run_sweep(spec_from_dict({k: v for k, v in tree.items() if k != "executor"}), progress=False)

    # the job disappears (here: cancelled behind the sweep's back, before it started): lost, submitted again
    slurm_cluster.run("scancel", first)
    slurm_cluster.wait_idle()
    assert sweep_main(["sweep", held]) == 0
    out = capsys.readouterr().out
    second = job_id()
    assert second != first and slurm_cluster.queue() == {second: "PENDING"}
    assert f"FAILED (job {first}: lost: it left the queue before it started); submitted again (failures: 1" in out
    # a queued run is never submitted twice
    assert sweep_main(["sweep", held]) == 0
    assert job_id() == second and list(slurm_cluster.queue()) == [second]

    # lost again: out of retries, one error line, nothing submitted
    slurm_cluster.run("scancel", second)
    slurm_cluster.wait_idle()
    assert sweep_main(["sweep", held]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: 1 run(s) failed on Slurm and are out of retries: "
                                                   f"{name}") and "--retry-failed" in err
    assert slurm_cluster.queue() == {} and entries(sweep_dir)[name]["failures"] == 2

    # after fixing the cause: --retry-failed submits it again; --cancel takes it back
    assert sweep_main(["sweep", held, "--retry-failed"]) == 0
    third = job_id()
    assert slurm_cluster.queue() == {third: "PENDING"}
    assert sweep_main(["sweep", held, "--cancel"]) == 0
    assert f"cancelled 1 Slurm job(s): {third}" in capsys.readouterr().out
    slurm_cluster.wait_idle()
    assert entries(sweep_dir)[name]["state"] == "cancelled"

    # without the hold it trains and evaluates; the cancelled run was not counted as a failure
    free = write_sweep(tmp_path / "free.yaml", {**tree, "executor": {"slurm": {"cpus_per_gpu": 1, "retries": 1}}})
    assert sweep_main(["sweep", free, "--wait"]) == 0
    entry = entries(sweep_dir)[name]
    assert entry["state"] == "done" and entry["attempts"] == 4 and entry["failures"] == 0
    assert entry["jobs"] == [first, second, third, entry["jobs"][3]]
    assert entry["eval"]["test_loss"] > 0 and os.path.exists(sweep_dir / "runs" / name / "eval.json")
    assert sweep_main(["sweep", free]) == 0 and slurm_cluster.queue() == {}


def test_bad_slurm_settings_get_one_line(slurm_cluster, tmp_path, dataset_dir, monkeypatch, capsys):
    def error_of(settings, *flags, **changes):
        out_dir = tmp_path / f"sweep{len(list(tmp_path.glob('*.yaml')))}"
        sweep_file = write_sweep(tmp_path / f"{out_dir.name}.yaml", sweep_tree(out_dir, dataset_dir, settings,
                                                                               **changes))
        assert sweep_main(["sweep", sweep_file, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        return err

    assert "executor.slurm: unknown key 'partion' (valid keys: partition," in error_of({"partion": "debug"})
    # a partition Slurm rejects: its own message, passed on; nothing is submitted
    err = error_of({"partition": "nope"})
    assert "Slurm refused the jobs: sbatch: error: invalid partition specified: nope" in err
    # the node has 4 GPUs
    err = error_of({"gpus_per_run": 8}, num_gpus=8, base={
        **sweep_tree(tmp_path, dataset_dir)["base"], "deepspeed": {"zero_stage": 1},
        "train": {**sweep_tree(tmp_path, dataset_dir)["base"]["train"], "device": "auto", "global_batch": 8}})
    assert ("executor.slurm.gpus_per_run 8: the largest node of the default partition has 4 GPU(s); spread each "
            "run over nodes: nodes: 2, gpus_per_run: 4") in err
    assert slurm_cluster.queue() == {}
    assert not any(e.get("jobs") for manifest in tmp_path.glob("sweep*/manifest.json")
                   for e in entries(manifest.parent).values())
    # no Slurm here
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    sweep_file = write_sweep(tmp_path / "local.yaml", sweep_tree(tmp_path / "sweep", dataset_dir))
    assert sweep_main(["sweep", sweep_file, "--slurm"]) == 2
    assert "Slurm: sbatch is not on PATH" in capsys.readouterr().err


def test_signalled_job_is_requeued_and_resumes_exactly(slurm_cluster, tmp_path, dataset_dir, local_reference,
                                                       capsys):
    # One run: the job gets SIGUSR1 mid-run (what Slurm sends before the time limit); the trainer
    # checkpoints and exits with 75, the job requeues itself (same job id) and resumes to the same losses.
    sweep_dir = tmp_path / "sweep"
    sweep_file = write_sweep(tmp_path / "sweep.yaml", sweep_tree(sweep_dir, dataset_dir, {},
                                                                 grid={"sizes": ["100k"], "repeated_fraction": [0.0]}))
    name = RUNS[0]
    run_dir = sweep_dir / "runs" / name
    assert sweep_main(["sweep", sweep_file]) == 0
    job = entries(sweep_dir)[name]["job_id"]
    wait_for(lambda: last_step(run_dir) >= 20, 120, "the job to train 20 steps")
    slurm_cluster.run("scancel", "--signal=USR1", job)
    record = wait_for(lambda: (json.loads((run_dir / "job.json").read_text()) if
                               json.loads((run_dir / "job.json").read_text()).get("returncode") is not None else None),
                      60, "the trainer to stop at a checkpoint")
    assert record["returncode"] == 75 and record["requeued"] and record["signals"] == ["SIGUSR1"]
    assert sweep_main(["sweep", sweep_file, "--wait"]) == 0
    entry = entries(sweep_dir)[name]
    assert entry["state"] == "done" and entry["jobs"] == [job] and entry["attempts"] == 1  # requeued, not resubmitted
    assert json.loads((run_dir / "job.json").read_text())["restarts"] == 1
    attempts = (run_dir / "train.log").read_text().split("\n# ")[1:]
    assert len(attempts) == 2 and all(f"slurm job {job} on" in a for a in attempts)
    assert int(re.search(r"step (\d+)/", attempts[1]).group(1)) > 20  # continued, did not start over
    assert logged(run_dir) == local_reference[name]


def test_second_trainer_on_a_busy_run_folder_is_refused(slurm_cluster, tmp_path, dataset_dir):
    sweep_dir = tmp_path / "sweep"
    sweep_file = write_sweep(tmp_path / "sweep.yaml", sweep_tree(
        sweep_dir, dataset_dir, {}, grid={"sizes": ["100k"], "repeated_fraction": [0.0]}, budget={"steps": 1500}))
    run_dir = sweep_dir / "runs" / RUNS[0]
    assert sweep_main(["sweep", sweep_file]) == 0
    wait_for(lambda: last_step(run_dir) >= 10, 120, "the job to train")
    # Suspended (SIGSTOP), the job still holds its folder whatever the machine's load: the second trainer
    # cannot find it finished.
    slurm_cluster.run("scontrol", "suspend", entries(sweep_dir)[RUNS[0]]["job_id"])
    second = subprocess.run([sys.executable, "-m", "fasttrain.cli", "train", "--config", str(run_dir / "config.yaml"),
                             "--resume"], capture_output=True, text=True, timeout=120)
    assert sweep_main(["sweep", sweep_file, "--cancel"]) == 0
    assert second.returncode == 2
    err = second.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(run_dir) in err
    assert socket.gethostname().split(".")[0] in err and re.search(r"pid \d+", err), err


def test_a_job_file_that_would_run_code_is_refused(tmp_path):
    # What a Slurm job loads first is submitit's pickle of its work: a planted payload must not run.
    import cloudpickle
    from submitit.core.utils import DelayedSubmission

    from fasttrain.sweep.slurm_job import JobFailed, check_submitted, run_job

    genuine = tmp_path / "1_submitted.pkl"
    genuine.write_bytes(cloudpickle.dumps(DelayedSubmission(run_job, {"run_dirs": ["/r"], "train": None,
                                                                      "evaluate": None})))
    check_submitted(str(genuine))  # what submit() writes passes

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    planted = tmp_path / "2_submitted.pkl"
    planted.write_bytes(cloudpickle.dumps(DelayedSubmission(run_job, {"run_dirs": [Payload()]})))
    with pytest.raises(JobFailed, match="refused: the job file names posix.system"):
        check_submitted(str(planted))
    assert not os.path.exists(tmp_path / "ran")
