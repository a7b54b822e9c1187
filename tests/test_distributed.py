"""dfkd under torchrun (gloo on CPU, 2 processes): the world read from the launcher's variables, sharded
synthesis equal to one process's, one ledger record per stage that sums every rank's share, the lock held by
the job, a killed rank's energy recovered, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_fails, image_folder
from safetensors import safe_open

from dfkd.carbon.ledger import read_ledger, verify_ledger
from dfkd.carbon.meter import combine_ranks, pending_path, recover_pending
from dfkd.config.recipe import RECIPES_DIR
from dfkd.distributed import SINGLE, World, world_from_env
from dfkd.errors import DfkdError
from dfkd.report.audit import audit_run
from dfkd.report.build import build_report
from dfkd.report.format import device_cell

TORCHRUN_ENV = {
    "WORLD_SIZE": "2",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def test_the_world_comes_from_the_launchers_variables() -> None:
    assert world_from_env({}) is SINGLE
    assert world_from_env({"WORLD_SIZE": "1"}) is SINGLE
    world = world_from_env({**TORCHRUN_ENV, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.node, world.nodes) == (3, 4, 1, 1, 2)
    assert not world.primary and not world.meters_host and world.several
    with pytest.raises(DfkdError, match="is not a whole number"):
        world_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(DfkdError, match="LOCAL_RANK is not"):
        world_from_env({key: value for key, value in TORCHRUN_ENV.items() if key != "LOCAL_RANK"})
    with pytest.raises(DfkdError, match="MASTER_ADDR is not"):
        world_from_env({key: value for key, value in TORCHRUN_ENV.items() if key != "MASTER_ADDR"})
    with pytest.raises(DfkdError, match="do not describe a job"):
        world_from_env({**TORCHRUN_ENV, "RANK": "2"})


def test_commands_not_built_for_several_processes_refuse_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    message = cli_fails("run", str(RECIPES_DIR / "quickstart.toml"), "--run", str(run), "--dry-run")
    assert "dfkd run --dry-run runs in one process, but dfkd was launched as rank 0 of 2" in message
    assert "dfkd evaluate runs in one process" in cli_fails("evaluate", str(run), "--data", str(tmp_path))
    assert "dfkd export runs in one process" in cli_fails("export", str(run), "--format", "onnx")
    assert "dfkd report runs in one process" in cli_fails("report", str(run))
    assert not run.exists()


def _rank_record(rank: int, node: int, cpu: float, gpu: float | None, status: str = "complete") -> dict[str, Any]:
    energy = {"cpu": cpu, "gpu": gpu, "ram": cpu / 2}
    energy["total"] = None if gpu is None else cpu + gpu + cpu / 2
    return {
        "stage": "synthesis",
        "info": {"method": "deepinversion"},
        "status": status,
        "error": None if status == "complete" else "killed",
        "start_utc": "2026-12-03T10:00:00.000Z",
        "end_utc": f"2026-12-03T10:00:0{rank + 1}.000Z",
        "duration_s": 1.0 + rank,
        "device": {"type": "cpu", "name": "cpu"},
        "energy_kwh": energy,
        "pue": 1.5,
        "energy_kwh_with_pue": {k: None if v is None else v * 1.5 for k, v in energy.items()},
        "energy_sources": {"cpu": "test", "gpu": "test", "ram": "test"},
        "gpu_energy_nvml_kwh": gpu,
        "gpu_energy_codecarbon_kwh": None,
        "carbon_intensity_g_per_kwh": 400.0,
        "carbon_intensity_source": "test",
        "co2eq_g": None,
        "flops": 10.0,
        "flops_method": "test",
        "result": {},
        "work": {},
        "metering": {"ok": True, "failures": []},
        "versions": {},
        "rank": {"rank": rank, "world_size": 3, "node": node, "local_rank": rank % 2, "host": f"h{node}"},
    }


def test_a_jobs_record_sums_its_ranks_and_names_a_missing_one() -> None:
    combined = combine_ranks([_rank_record(1, 0, 0.0, 2.0), _rank_record(0, 0, 4.0, 1.0), _rank_record(2, 1, 6.0, 3.0)])
    assert combined["energy_kwh"] == {"cpu": 10.0, "gpu": 6.0, "ram": 5.0, "total": 21.0}
    assert combined["co2eq_g"] == pytest.approx(21.0 * 1.5 * 400.0)
    assert combined["gpu_energy_nvml_kwh"] == 6.0
    assert combined["end_utc"] == "2026-12-03T10:00:03.000Z" and combined["duration_s"] == 1.0  # rank 0's
    job = combined["distributed"]
    assert (job["world_size"], job["nodes"]) == (3, 2)
    assert [r["rank"] for r in job["ranks"]] == [0, 1, 2]
    assert [(n["node"], n["ranks"], n["energy_kwh"]["total"]) for n in job["node_shares"]] == [
        (0, [0, 1], 9.0),
        (1, [2], 12.0),
    ]
    assert combined["metering"]["ok"] and "rank" not in combined
    partial = combine_ranks([_rank_record(0, 0, 4.0, 1.0), _rank_record(2, 1, 6.0, None, "interrupted")])
    assert partial["status"] == "interrupted" and partial["energy_kwh"]["gpu"] is None
    assert partial["metering"]["failures"] == ["rank 1 left no record: its energy is missing"]


def test_a_killed_jobs_snapshots_become_one_record_and_a_late_one_is_only_deleted(tmp_path: Path) -> None:
    ledger = tmp_path / "carbon.jsonl"
    for rank in (0, 1, 2):
        snapshot = {**_rank_record(rank, rank // 2, 1.0, 1.0), "status": "running"}
        pending_path(ledger, "synthesis", rank).write_text(json.dumps(snapshot))
    (appended,) = recover_pending(ledger)
    assert appended["status"] == "interrupted" and "process killed" in appended["error"]
    assert appended["energy_kwh"]["total"] == pytest.approx(3 * 2.5)
    assert appended["distributed"]["world_size"] == 3
    assert not list(tmp_path.glob(".pending-*"))
    # A rank's snapshot written after the job's record (its last flush lost the race) is not counted twice.
    pending_path(ledger, "synthesis", 2).write_text(json.dumps(_rank_record(2, 1, 1.0, 1.0)))
    assert recover_pending(ledger) == []
    assert len(read_ledger(ledger)) == 1 and not list(tmp_path.glob(".pending-*"))
    assert verify_ledger(ledger) == []


def test_the_report_names_ranks_and_nodes() -> None:
    row = {"device": "cuda:0", "device_model": "H100", "ranks": 8, "nodes": 2}
    assert device_cell(row) == "cuda:0 (H100) x 8 ranks on 2 nodes"
    assert device_cell({"device": "cpu", "device_model": None}) == "cpu"
    assert World(rank=0, size=1).label().startswith("rank 0 of 1")


# --- real torchrun launches (gloo, CPU) -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    return {key: value for key, value in os.environ.items() if key not in drop}


def _synthesize_args(teacher: Path, method: str, images: int, iterations: int = 2) -> list[str]:
    args = ["synthesize", "--method", method, "--teacher", str(teacher), "--num-images", str(images)]
    args += ["--batch-size", "4", "--iterations", str(iterations), "--device", "cpu", "--json"]
    args += ["--grid-intensity", "400"]
    return args + (["--set", "nz=16", "--set", "ngf=8"] if method != "deepinversion" else [])


def _torchrun(*args: str, nproc: int = 2, launcher: list[str] | None = None) -> list[str]:
    port = ["--master-port", str(_free_port())] if launcher is None else []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *(launcher or port),
            "-m", "dfkd", *args]  # fmt: skip


def _single(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """One process, computing as each torchrun worker does: CPU float sums depend on the thread count, and
    torchrun starts its workers with OMP_NUM_THREADS=1."""
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dfkd", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _shards(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((run / "synthetic").glob("shard-*.safetensors"))}


@pytest.mark.slow
def test_sharded_deepinversion_makes_one_process_set_and_one_record(tmp_path: Path, tiny_teacher: Path) -> None:
    args = _synthesize_args(tiny_teacher, "deepinversion", 20)
    assert _single(*args, "--run", "one", cwd=tmp_path).returncode == 0
    result = _launch(_torchrun(*args, "--run-dir", "two"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["quality"]["images"] == 20, "the result is printed once, by rank 0"
    assert _shards(tmp_path / "two") == _shards(tmp_path / "one") and len(_shards(tmp_path / "one")) == 5
    (record,) = read_ledger(tmp_path / "two" / "carbon.jsonl")
    job = record["distributed"]
    assert (job["world_size"], job["nodes"], [r["rank"] for r in job["ranks"]]) == (2, 1, [0, 1])
    # codecarbon meters the machine once (local rank 0); the other rank's CPU and RAM are in that share
    assert job["ranks"][1]["energy_kwh"]["cpu"] == 0.0 and "local rank 0" in job["ranks"][1]["energy_sources"]["cpu"]
    assert record["work"]["images_made"] == 20 and record["work"]["world_size"] == 2
    assert record["flops"] == pytest.approx(read_ledger(tmp_path / "one" / "carbon.jsonl")[0]["flops"])
    assert audit_run(tmp_path / "two") == []
    row = build_report([tmp_path / "two"])["runs"][0]["rows"][0]
    assert (row["ranks"], row["nodes"]) == (2, 1)
    # the lock was the job's, not a rank's: nothing is left behind, and the set resumes as finished
    assert not list((tmp_path / "two").glob(".pending-*"))
    again = _launch(_torchrun(*args, "--run-dir", "two"), tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["work"]["already_finished"]
    assert len(read_ledger(tmp_path / "two" / "carbon.jsonl")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cmi", "fast"])
def test_stateful_methods_keep_one_state_across_ranks(tmp_path: Path, tiny_teacher: Path, method: str) -> None:
    args = _synthesize_args(tiny_teacher, method, 20)
    assert _single(*args, "--run", "one", cwd=tmp_path).returncode == 0
    result = _launch(_torchrun(*args, "--run-dir", "two"), tmp_path)
    assert result.returncode == 0, result.stderr
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert list(one) == list(two)
    # round 1 starts from the same state on both ranks, so shard 0 is the single process's shard 0
    assert two["shard-00000.safetensors"] == one["shard-00000.safetensors"]
    assert audit_run(tmp_path / "two") == []

    def state(run: str) -> tuple[dict[str, Any], dict[str, Any]]:
        with safe_open(str(tmp_path / run / "synthetic" / "state-00004.safetensors"), "pt") as f:
            return json.loads(f.metadata()["scalars"]), {key: f.get_tensor(key) for key in f.keys()}

    (scalars_one, tensors_one), (scalars_two, tensors_two) = state("one"), state("two")
    if method == "cmi":
        # the bank holds every rank's features: all 20 images', the first shard's as one process has them
        assert scalars_two["bank_count"] == scalars_one["bank_count"] == 20
        assert tensors_two["bank"][:4].equal(tensors_one["bank"][:4])
        assert not tensors_two["bank"][4:8].equal(tensors_one["bank"][4:8])  # made from another bank
    else:
        assert scalars_two["batches"] == scalars_one["batches"] == 5
        assert set(tensors_two) == set(tensors_one)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=`rank` under launcher `parent`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_synthesis_is_recovered_and_the_set_finishes_with_another_world_size(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    args = _synthesize_args(tiny_teacher, "deepinversion", 48, iterations=150)
    run = tmp_path / "two"
    job = subprocess.Popen(
        _torchrun(*args, "--run-dir", str(run)), cwd=tmp_path, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "synthetic" / "shard-00002.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(job.pid, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    # Rank 0 either records the job at once (its collective failed when rank 1 died) or is stopped by torchrun
    # first, leaving the ranks' snapshots for the next run to recover: one interrupted record either way.
    recorded = read_ledger(run / "carbon.jsonl")
    assert recorded or list(run.glob(".pending-synthesis*.json")), "the killed job's energy is kept"
    # resumed by one process: a world size of its own, the same images (DeepInversion keeps no state)
    finished = _single(*args, "--run", str(run), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert _single(*args, "--run", "one", cwd=tmp_path).returncode == 0
    assert _shards(run) == _shards(tmp_path / "one")
    records = read_ledger(run / "carbon.jsonl")
    assert [r["status"] for r in records] == ["interrupted", "complete"]
    assert records[0]["distributed"]["world_size"] == 2 and "distributed" not in records[1]
    assert audit_run(run) == []


@pytest.mark.slow
def test_two_nodes_on_loopback_and_a_run_dir_one_node_cannot_see(tmp_path: Path, tiny_teacher: Path) -> None:
    args = _synthesize_args(tiny_teacher, "deepinversion", 16)
    assert _single(*args, "--run", "one", cwd=tmp_path).returncode == 0

    def two_nodes(run: str, cwd1: Path) -> list[subprocess.CompletedProcess[str]]:
        port = str(_free_port())
        nodes = []
        for node, cwd in ((0, tmp_path), (1, cwd1)):
            launcher = ["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port]
            command = _torchrun(*args, "--run-dir", run, nproc=1, launcher=launcher)
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            nodes.append(subprocess.Popen(command, cwd=cwd, env=_env(), text=True, **pipes))  # type: ignore[call-overload]
        finished = []
        for process in nodes:
            out, errors = process.communicate(timeout=300)
            finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, errors))
        return finished

    results = two_nodes(str(tmp_path / "shared"), tmp_path)
    assert [r.returncode for r in results] == [0, 0], results[1].stderr
    assert _shards(tmp_path / "shared") == _shards(tmp_path / "one")
    (record,) = read_ledger(tmp_path / "shared" / "carbon.jsonl")
    assert record["distributed"]["nodes"] == 2
    assert [n["ranks"] for n in record["distributed"]["node_shares"]] == [[0], [1]]
    assert audit_run(tmp_path / "shared") == []
    # a relative run dir resolves to another folder on "node" 1: refused on every rank, said once
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "local").mkdir()
    refused = two_nodes("local", elsewhere)
    assert all(r.returncode != 0 for r in refused)
    errors = [line for r in refused for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not the one rank 0 locked" in errors[0] and "rank 1:" in errors[0], errors
    assert not list((tmp_path / "local").glob("synthetic")), "nothing made"


def _distill_args(epochs: int) -> list[str]:
    return ["distill", "--student", "tiny", "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.4", "--device",
            "cpu", "--json", "--grid-intensity", "400"]  # fmt: skip


@pytest.mark.slow
def test_ddp_distillation_resumes_after_a_rank_is_killed_and_matches_one_process(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    made = _launch(_torchrun(*_synthesize_args(tiny_teacher, "deepinversion", 64), "--run-dir", "two"), tmp_path)
    assert made.returncode == 0, made.stderr
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    # a batch the ranks cannot split evenly is refused, once, before any training
    odd = _launch(_torchrun(*_distill_args(2)[:-2], "--batch-size", "7", "--run-dir", "two"), tmp_path)
    errors = [line for line in odd.stderr.splitlines() if line.startswith("error:")]
    assert odd.returncode != 0 and len(errors) == 1 and "does not split evenly over 2 ranks" in errors[0], odd.stderr
    run = tmp_path / "two"
    job = subprocess.Popen(
        _torchrun(*_distill_args(300), "--run-dir", str(run)), cwd=tmp_path, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    folder = run / "student" / "tau=stochastic"
    deadline = time.monotonic() + 120
    while not list(folder.glob("resume-e*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(job.pid, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    # the job restarted (as torchrun's elastic restart would): it resumes from rank 0's last saved epoch
    resumed = _launch(_torchrun(*_distill_args(300), "--run-dir", str(run)), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    records = read_ledger(run / "carbon.jsonl")
    distillation = [r for r in records if r["stage"] == "distillation"]
    assert [r["status"] for r in distillation] == ["interrupted", "complete"]
    assert all(r["distributed"]["world_size"] == 2 for r in distillation)
    assert distillation[1]["work"]["resumed_from_epoch"] > 0
    assert audit_run(run) == []
    # the same student as one process, within noise: rank BN statistics and sum order differ, nothing else
    single = _single(*_distill_args(300), "--run", str(tmp_path / "one"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    losses = [
        [json.loads(line)["loss"] for line in (root / "student" / "tau=stochastic" / "metrics.jsonl").open()]
        for root in (run, tmp_path / "one")
    ]
    assert len(losses[0]) == len(losses[1]) == 300
    assert losses[0][-1] == pytest.approx(losses[1][-1], rel=0.05)
    from dfkd.checkpoints import load_checkpoint

    student, meta = load_checkpoint(run / "student" / "student.safetensors")
    assert meta.arch == "tiny"


@pytest.mark.slow
def test_a_recipe_runs_end_to_end_under_torchrun(tmp_path: Path, tiny_recipe_sets: list[str]) -> None:
    quickstart = str(RECIPES_DIR / "quickstart.toml")
    data = image_folder(tmp_path / "data", classes=10)
    sets = [*tiny_recipe_sets, "--set", f"evaluate.data={data}"]
    result = _launch(_torchrun("run", quickstart, "--run-dir", "job", *sets, "--json"), tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["carbon"]["fully_metered"] and summary["export"] and summary["inference"]
    assert "test_acc" in summary["distillation"], "evaluated by rank 0 while the others wait"
    records = read_ledger(tmp_path / "job" / "carbon.jsonl")
    assert [(r["stage"], "distributed" in r) for r in records][:2] == [("synthesis", True), ("distillation", True)]
    assert audit_run(tmp_path / "job") == []
    interleaved = _launch(
        _torchrun("run", str(RECIPES_DIR / "c10_wrn40_2-wrn16_1_fast.toml"), "--run-dir", "rounds"), tmp_path
    )
    assert "the interleaved mode" in interleaved.stderr and "runs in one process" in interleaved.stderr


@pytest.mark.slow
def test_a_refusal_inside_a_round_stops_every_rank_said_once_and_recorded_once(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    args = [*_synthesize_args(tiny_teacher, "deepinversion", 16), "--set", "bn_weight=1e38"]  # the loss overflows
    failed = _launch(_torchrun(*args, "--run-dir", "nan"), tmp_path)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode != 0 and len(errors) == 1 and "non-finite loss" in errors[0], failed.stderr
    (record,) = read_ledger(tmp_path / "nan" / "carbon.jsonl")
    assert record["status"] == "interrupted" and record["distributed"]["world_size"] == 2
    assert record["metering"]["ok"], "every rank handed its record over: none is missing"
    assert not list((tmp_path / "nan").glob(".pending-*")) and audit_run(tmp_path / "nan") == []
