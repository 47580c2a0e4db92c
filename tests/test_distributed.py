"""Data-parallel training under torchrun (gloo, two processes on the CPU) against one process."""
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastlm.checkpoint import load_checkpoint
from fastlm.config import TrainConfig, check_config
from fastlm.device import cpu_bf16_unit
from fastlm.errors import TrainingError
from fastlm.models.lstm import sequence_dropout
from fastlm.train import main as train_main
from fastlm.training.distributed import World, fresh_namespace, leave
from fastlm.training.trainer import train

TINY = ["--embed-size", "16", "--hidden-size", "32", "--batch-size", "8", "--seq-len", "5", "--lr", "0.01",
        "--log-interval", "1", "--eval-batch-size", "4", "--device", "cpu", "--epochs", "1"]


WORKERS = Path(__file__).parent / "workers"


def torchrun(nproc, *argv, env=None, wait=True, restarts=0, program=("-m", "fastlm.train")):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={restarts}", *program, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def free_port():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def records(run, split):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.parametrize("flag, rows", [("batch_size", 5), ("eval_batch_size", 3)])
def test_rows_are_split_evenly_or_refused(flag, rows):
    assert World(1, 2).rows(8) == slice(4, 8)
    option = f"--{flag.replace('_', '-')}"
    with pytest.raises(TrainingError, match=f"{option} {rows} is not divisible by the world size 2"):
        check_config(TrainConfig(out="run", **{flag: rows}), World(0, 2))


@pytest.mark.parametrize("world", [World(0, 2), World(launch="a-launch")], ids=["two-ranks", "one-rank-under-torchrun"])
def test_torchrun_needs_an_out_folder_that_every_attempt_finds(world):
    with pytest.raises(TrainingError, match="under torchrun pass --out"):
        check_config(TrainConfig(), world)
    check_config(TrainConfig(), World())  # one process without torchrun: a fresh runs/<time> folder


def test_leaving_frees_ddp_before_its_process_group(monkeypatch):
    # Once seen as an abort of one rank in ~1 of 20 two-rank runs, after training had finished:
    # DDP outlived the process group it holds and was freed during interpreter shutdown.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    destroy = dist.destroy_process_group
    gc.disable()  # so that only `leave` can run the cyclic collector
    try:
        def train_briefly():
            ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
            ddp(torch.randn(2, 4)).sum().backward()
            # In a fresh interpreter DDP's first __init__ frame stays referenced and holds it in a
            # cycle; that depends on what ran before, so the cycle is made explicit here.
            state = {"model": ddp}
            state["self"] = state
            return weakref.ref(ddp)

        ddp = train_briefly()
        assert ddp() is not None
        alive_at_destroy = []
        monkeypatch.setattr(dist, "destroy_process_group", lambda: (alive_at_destroy.append(ddp() is not None),
                                                                    destroy()))
        leave(World(0, 2))
        assert alive_at_destroy == [False]
    finally:
        gc.enable()
        if dist.is_initialized():
            destroy()


def test_a_restarted_job_forms_its_group_under_a_namespace_of_its_own():
    store = dist.HashStore()  # torchrun's store, as the killed attempt left it
    store.set("fastlm/namespace", "fastlm/last-attempt")
    store.set("fastlm/last-attempt/hello/1", "last-attempt-token")
    namespaces = {}
    wait = timedelta(seconds=30)
    rank1 = threading.Thread(target=lambda: namespaces.setdefault(1, fresh_namespace(store, 1, 2, wait)))
    rank1.start()
    time.sleep(0.5)  # rank 1 read the last attempt's namespace and waits there in vain
    namespaces[0] = fresh_namespace(store, 0, 2, wait)
    rank1.join(timeout=30)
    assert namespaces[0] == namespaces[1] and namespaces[0] != "fastlm/last-attempt"


def test_two_ranks_train_like_one_process(corpus_dir, tmp_path):
    argv = ["--data", str(corpus_dir), *TINY, "--max-steps", "10", "--eval-interval", "10"]
    torchrun(2, *argv, "--out", str(tmp_path / "two"))
    one = train(TrainConfig(data=str(corpus_dir), embed_size=16, hidden_size=32, batch_size=8, seq_len=5, lr=0.01,
                            log_interval=1, eval_batch_size=4, device="cpu", epochs=1, max_steps=10, eval_interval=10,
                            out=str(tmp_path / "one")))
    two_losses = [r["loss"] for r in records(tmp_path / "two", "train")]
    assert len(two_losses) == 10
    assert two_losses == pytest.approx(one.train_losses, rel=1e-5)
    ppl_one, ppl_two = (records(tmp_path / run, "valid")[0]["ppl"] for run in ("one", "two"))
    assert ppl_two == pytest.approx(ppl_one, rel=1e-5)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6), name
    assert b["state"][0].shape == (1, 8, 32)  # the carried state of all rows, not one rank's
    assert torch.allclose(a["state"][0], b["state"][0], atol=1e-5)


def test_a_two_rank_run_resumes_in_one_process(corpus_dir, tmp_path):
    argv = ["--data", str(corpus_dir), *TINY]
    torchrun(2, *argv, "--max-steps", "10", "--out", str(tmp_path / "straight"))
    torchrun(2, *argv, "--max-steps", "5", "--out", str(tmp_path / "split"))
    resumed = train(TrainConfig(), resume=str(tmp_path / "split"), overrides={"max_steps": 10})
    straight = [r["loss"] for r in records(tmp_path / "straight", "train")]
    first = [r["loss"] for r in records(tmp_path / "split", "train")][:5]
    assert first + resumed.train_losses == pytest.approx(straight, rel=1e-5)


def test_a_bad_resume_stops_every_rank_with_rank_0s_message(tmp_path):
    proc = torchrun(2, "--resume", str(tmp_path / "missing"), wait=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count(f"error: no checkpoint at {tmp_path / 'missing'}") == 1, err[-2000:]


def test_a_dying_rank_ends_the_run_instead_of_hanging(corpus_dir, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(2, "--data", str(corpus_dir), *TINY, "--epochs", "1000", "--out", str(run),
                    env={"FASTLM_DIST_TIMEOUT": "30"}, wait=False)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGKILL)
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert "fastlm.train FAILED" in err or "ChildFailedError" in err or "SIGKILL" in err, err[-2000:]


@pytest.mark.parametrize("locked", [False, True], ids=["per-element", "locked"])
def test_each_rank_drops_its_rows_of_the_one_process_mask(locked):
    x, p, ranks = torch.randn(6, 4, 5), 0.4, 3
    torch.manual_seed(7)
    if locked:  # one mask per row and feature, for every time step
        expected = x * (torch.empty(6, 1, 5).bernoulli_(1 - p) / (1 - p))
    else:  # torch's own dropout in one process
        expected = torch.nn.functional.dropout(x, p, training=True)
    shards = []
    for rank in range(ranks):
        torch.manual_seed(7)  # every rank's generator starts alike
        shards.append(sequence_dropout(x[2 * rank:2 * rank + 2], p, True, locked, shard=(rank, ranks)))
    assert torch.equal(torch.cat(shards), expected)


REGULARISED = {  # the recipe's own flags with tiny shapes, then every kind of dropout on top
    "small-recipe-sgd-locked-weight-drop": ["--recipe", "small", "--embed-size", "16", "--hidden-size", "16",
                                            "--lr", "5", "--dropout", "0.3", "--locked-dropout", "--weight-drop",
                                            "0.2"],
    "adam-two-layers-dropout": ["--embed-size", "16", "--hidden-size", "32", "--num-layers", "2", "--lr", "0.01",
                                "--dropout", "0.3"],
}


@pytest.mark.parametrize("regularisation", REGULARISED.values(), ids=REGULARISED.keys())
def test_two_ranks_drop_out_exactly_like_one_process(corpus_dir, tmp_path, regularisation):
    argv = ["--data", str(corpus_dir), *regularisation, "--batch-size", "8", "--seq-len", "5", "--log-interval", "1",
            "--eval-batch-size", "4", "--device", "cpu", "--epochs", "1", "--max-steps", "8"]
    proc = torchrun(2, *argv, "--out", str(tmp_path / "two"))
    assert proc.stdout.count("--amp bf16 trains") == (cpu_bf16_unit() is not None)  # rank 0's hint, once
    assert train_main([*argv, "--out", str(tmp_path / "one")]) == 0
    one, two = ([r["loss"] for r in records(tmp_path / run, "train")] for run in ("one", "two"))
    assert len(two) == 8 and two == pytest.approx(one, rel=1e-5)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6), name


def two_machines(*argv, cwd, restarts=0, program=("-m", "fastlm.train"), env=None, static=False):
    """Two torchrun agents meeting at a c10d rendezvous, as on two machines, each in its folder of
    `cwd`; their outputs, once both succeeded. `static`: torchrun's static rendezvous instead, which
    puts rank 0 on the first machine (`--node-rank 0`)."""
    port, agents = free_port(), []
    for node_rank, machine in enumerate(cwd):
        rendezvous = (["--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
                      if static else ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                      "--rdzv-id", "fastlm-test"])
        machine.mkdir(exist_ok=True)
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *rendezvous,
             f"--max-restarts={restarts}", *program, *argv], cwd=machine, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}))
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    return "".join(outputs)


KILLS = {  # (processes, machines, the rank killed, where: epochs done and step into the next)
    "one-machine": (2, 1, 1, "1,10"),
    "one-machine-before-the-first-checkpoint": (2, 1, 1, "0,30"),
    "one-process": (1, 1, 0, "1,10"),
    "two-machines": (2, 2, 1, "1,10"),  # the restart counts torchrun passes differ; a shared run folder
}


@pytest.mark.parametrize("processes, machines, rank, at", KILLS.values(), ids=KILLS.keys())
def test_a_killed_rank_restarts_the_job_from_its_last_checkpoint(corpus_dir, tmp_path, processes, machines, rank,
                                                                   at):
    argv = ["--data", str(corpus_dir), *TINY, "--epochs", "2", "--log-interval", "10", "--out", str(tmp_path / "run")]
    launch = dict(restarts=1, program=[str(WORKERS / "a_rank_dies_once.py")],
                  env={"DIES_ONCE_MARKER": str(tmp_path / "died"), "DIES_RANK": str(rank), "DIES_AT": at})
    if machines == 1:
        output = torchrun(processes, *argv, **launch).stdout
    else:
        output = two_machines(*argv, cwd=[tmp_path / "a", tmp_path / "b"], **launch)
    assert (tmp_path / "died").exists() and "torchrun restarted the job: going on from" in output
    assert train_main([*argv[:-1], str(tmp_path / "uninterrupted")]) == 0
    for split in ("train", "valid", "test"):  # the killed attempt's records after the checkpoint are gone
        restarted, uninterrupted = (records(tmp_path / run, split) for run in ("run", "uninterrupted"))
        assert [r["global_step"] for r in restarted] == [r["global_step"] for r in uninterrupted], split
        assert [r["loss" if split != "test" else "ppl"] for r in restarted] == pytest.approx(
            [r["loss" if split != "test" else "ppl"] for r in uninterrupted], rel=1e-5), split
    a, b = load_checkpoint(tmp_path / "uninterrupted"), load_checkpoint(tmp_path / "run")
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6), name


def test_the_same_command_again_is_refused_not_taken_for_a_restart(corpus_dir, tmp_path):
    argv = ["--data", str(corpus_dir), *TINY, "--max-steps", "5", "--out", str(tmp_path / "run")]
    torchrun(2, *argv)
    again = torchrun(2, *argv, restarts=1, wait=False)  # refused in both attempts
    _, err = again.communicate(timeout=120)
    assert again.returncode != 0 and err.count("already holds a run") == 2, err[-2000:]
    assert load_checkpoint(tmp_path / "run")["global_step"] == 5


def test_a_run_on_rank_0s_disk_alone_resumes_on_two_machines(corpus_dir, tmp_path):
    # Rank 0 reads the checkpoint and hands it over: machine b never sees the run folder.
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    argv = ["--data", str(corpus_dir), *TINY]
    assert train_main([*argv, "--max-steps", "5", "--out", str(a / "run")]) == 0
    two_machines("--resume", "run", "--max-steps", "10", cwd=[a, b], static=True)
    assert not (b / "run").exists()
    assert train_main([*argv, "--max-steps", "10", "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = ([r["loss"] for r in records(run, "train")] for run in (a / "run", tmp_path / "straight"))
    assert resumed == pytest.approx(straight, rel=1e-5)


def test_two_machines_train_like_one_process(corpus_dir, tmp_path):
    # Each machine works in a folder of its own: the relative --out lands on rank 0's side only, and
    # best.pt is read there alone.
    machines, argv = [tmp_path / "machine-a", tmp_path / "machine-b"], ["--data", str(corpus_dir), *TINY]
    two_machines(*argv, "--out", "run", cwd=machines)  # a whole epoch: saved and tested
    runs = [machine / "run" for machine in machines if (machine / "run").exists()]
    assert len(runs) == 1, runs  # rank 0's machine alone holds the run folder
    assert train_main([*argv, "--out", str(tmp_path / "one")]) == 0
    for split, field in (("train", "loss"), ("test", "ppl")):  # the test of the last and the best weights
        two, one = ([r[field] for r in records(run, split)] for run in (runs[0], tmp_path / "one"))
        assert len(two) == len(one) > 0 and two == pytest.approx(one, rel=1e-5), split
