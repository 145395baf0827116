"""The results store: one current record per experiment, claims, damaged lines, old records, keys."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from helpers import compose_config
from tnt_lightning.results import CONFIG_KEY_VERSION, ResultsStore, config_key, read_records
from tnt_lightning.results.__main__ import doctor
from tnt_lightning.results.keys import comparable_config
from tnt_lightning.results.store import CLAIM_STALE_S


def record(i: int, status: str = "ok", key: str | None = None, task: str = "eval", **extra) -> dict:
    return {
        "run_id": f"run{i}",
        "task": task,
        "status": status,
        "config_key": key or f"{i:016x}",
        "config_key_version": CONFIG_KEY_VERSION,
        **extra,
    }


def test_an_ok_record_supersedes_failures_and_is_never_replaced_by_one(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(record(1, "failed", key="a" * 16))
    assert store.recorded("eval", "a" * 16) is None and store.current("eval", "a" * 16)["status"] == "failed"
    store.append(record(2, "ok", key="a" * 16))
    store.append(record(3, "interrupted", key="a" * 16))
    assert store.recorded("eval", "a" * 16)["run_id"] == "run2"
    assert [r["run_id"] for r in read_records(tmp_path)] == ["run2"]
    assert [r["run_id"] for r in read_records(tmp_path, history=True)] == ["run1", "run2", "run3"]


def test_every_appended_line_is_whole_and_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        for i in range(3):
            ResultsStore(tmp_path).append(record(i, payload="x" * 10_000))
    finally:
        os.umask(old)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ["run0", "run1", "run2"]
    assert stat.S_IMODE((tmp_path / "results.jsonl").stat().st_mode) == 0o644
    index = list((tmp_path / "index").rglob("*.json"))
    assert len(index) == 3 and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in index)
    assert not list(tmp_path.rglob("*.tmp"))


def test_damaged_and_foreign_lines_are_reported_by_number_and_skipped(tmp_path, caplog):
    store = ResultsStore(tmp_path)
    store.append(record(1))
    with open(store.path, "a") as f:
        f.write('{"run_id": "torn", "sta\n[1, 2]\n{"hello": "world"}\n')
    store.append(record(2))
    with open(store.path, "a") as f:
        f.write('{"run_id": "killed mid-write"')  # no newline: the next append must stay readable
    store.append(record(3))
    with caplog.at_level("WARNING"):
        records = read_records(tmp_path)
    assert [r["run_id"] for r in records] == ["run1", "run2", "run3"]
    warned = caplog.text
    assert "results.jsonl:2 skipped" in warned and ":3 skipped" in warned and ":4 skipped" in warned
    assert ":6 skipped" in warned
    assert [d.number for d in store.damaged_lines()] == [2, 3, 4, 6]

    assert doctor(tmp_path, repair=False) == 1
    assert doctor(tmp_path, repair=True) == 0
    assert store.damaged_lines() == [] and [r["run_id"] for r in read_records(tmp_path)] == [
        "run1",
        "run2",
        "run3",
    ]
    (aside,) = tmp_path.glob("results.jsonl.damaged-*")
    assert len(aside.read_text().splitlines()) == 4  # nothing is lost: the damaged lines are kept aside


def test_a_store_without_index_and_records_of_the_old_key_rule_still_match(tmp_path, compose_cfg):
    """A results.jsonl written before the index (and before config_key v2) is indexed once, and
    its records are found under the current key."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg("method=topk", "keep_rate=0.3"), resolve=True, enum_to_str=True)
    old = {"run_id": "v1", "task": "eval", "status": "ok", "config_key": "0123456789abcdef", "config": cfg}
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    store = ResultsStore(tmp_path)
    assert store.recorded("eval", config_key(cfg))["run_id"] == "v1"
    assert (tmp_path / "index" / "VERSION").exists()


def test_a_claim_keeps_a_second_job_out_until_released(tmp_path):
    store = ResultsStore(tmp_path)
    first = store.begin("eval", "k" * 16, "a1", skip_recorded=True)
    second = store.begin("eval", "k" * 16, "a2", skip_recorded=True)
    assert first.claim is not None and second.claim is None
    assert second.running_elsewhere["attempt_id"] == "a1" and second.running_elsewhere["pid"] == os.getpid()
    store.append(record(1, key="k" * 16, attempt_id="a1"))
    first.claim.release()
    third = store.begin("eval", "k" * 16, "a3", skip_recorded=True)
    assert third.claim is None and third.recorded["run_id"] == "run1"
    rerun = store.begin("eval", "k" * 16, "a4", skip_recorded=False)
    assert rerun.claim is not None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_jobs_claim_is_taken_over_and_its_unindexed_record_recovered(tmp_path):
    """A job killed after appending its record but before indexing it: the next job finds the
    record through the dead job's claim, and does not run the experiment again."""
    store = ResultsStore(tmp_path)
    store.check_writable()
    store.append(record(0))
    claim = store.claims_dir / f"eval-{'d' * 16}.json"
    holder = {"attempt_id": "dead", "pid": _dead_pid(), "host": socket.gethostname(), "results_offset": 0}
    claim.write_text(json.dumps(holder))
    with open(store.path, "a") as f:
        f.write(json.dumps(record(9, key="d" * 16, attempt_id="dead")) + "\n")
    (store.index_dir / "dd").mkdir(parents=True)
    (store.index_dir / "dd" / f".eval-{'d' * 16}.json.123.tmp").write_text("half")
    admission = store.begin("eval", "d" * 16, "next", skip_recorded=True)
    assert admission.claim is None and admission.recorded["run_id"] == "run9"
    assert not claim.exists() and not list(tmp_path.rglob("*.tmp"))


def test_a_claim_without_heartbeat_is_stale_and_a_requeued_slurm_job_takes_its_own(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    store.check_writable()
    claim = store.claims_dir / f"eval-{'e' * 16}.json"
    claim.write_text(json.dumps({"attempt_id": "x", "pid": 1, "host": "another-node"}))
    assert store.begin("eval", "e" * 16, "y", skip_recorded=True).running_elsewhere is not None
    old = time.time() - CLAIM_STALE_S - 10
    os.utime(claim, (old, old))
    taken = store.begin("eval", "e" * 16, "y", skip_recorded=True)
    assert taken.claim is not None
    taken.claim.release()

    slurm = {"job_id": "77", "array_job_id": None, "array_task_id": None}
    claim.write_text(json.dumps({"attempt_id": "x", "pid": 1, "host": "another-node", "slurm": slurm}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = store.begin("eval", "e" * 16, "z", skip_recorded=True)
    assert requeued.claim is not None and requeued.claim.holder["slurm"]["restart_count"] == 1
    requeued.claim.release()


def _race(root: str, barrier, results) -> None:
    barrier.wait()
    admission = ResultsStore(root).begin("eval", "r" * 16, f"p{os.getpid()}", skip_recorded=True)
    results.put(admission.claim is not None)
    barrier.wait()  # the holder stays alive until all have tried (a dead holder's claim is stale)


def test_of_many_jobs_starting_together_exactly_one_claims_the_experiment(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get() for _ in procs) == [False] * 5 + [True]


def test_check_writable_names_the_key_and_the_folder(tmp_path):
    from tnt_lightning.results import StoreError

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="paths.results_dir=.*a_file"):
        ResultsStore(blocker).check_writable()


@pytest.mark.parametrize(
    "change",
    [
        "paths.root_dir=/elsewhere",
        "data.num_workers=3",
        "data.eval_batch_size=7",
        "logger=wandb",
        "sweep_name=other",
        "trainer=cpu",
        "trainer=gpu",
        "trainer=ddp",
        "trainer.devices=4",
        "skip_recorded=false",
        "+extra.note=hello",
    ],
)
def test_how_a_run_is_launched_does_not_change_its_key(change, tmp_path):
    base = compose_config(["method=topk"], tmp_path)
    other = compose_config(["method=topk", change], tmp_path)
    assert config_key(container(base)) == config_key(container(other))


@pytest.mark.parametrize(
    "change",
    ["keep_rate=0.3", "method=evit", "seed=1", "measure.batch_size=8", "trainer.precision=bf16-mixed"],
)
def test_what_changes_a_result_changes_its_key(change, tmp_path):
    base = compose_config(["method=topk"], tmp_path)
    other = compose_config(["method=topk", change], tmp_path)
    assert config_key(container(base)) != config_key(container(other))


@pytest.mark.parametrize(
    ("fixed", "changes"),
    [
        (["method=none"], ["keep_rate=0.3", "schedule=multi"]),
        (["task=pretrain"], ["keep_rate=0.3", "method=topk", "method=tnt", "schedule=multi"]),
        (["method=tome", "schedule=multi", "method.r=8"], ["keep_rate=0.3", "schedule.rates=[0.7]"]),
    ],
)
def test_what_cannot_change_a_result_is_left_out_of_its_key(fixed, changes, tmp_path):
    """An unpruned evaluation is one experiment whatever the keep rate; so is a pretraining, and
    multi-layer ToMe driven by ``method.r``."""
    base = config_key(container(compose_config(fixed, tmp_path)))
    for change in changes:
        assert config_key(container(compose_config([*fixed, change], tmp_path))) == base, change
    assert config_key(container(compose_config([*fixed, "seed=1"], tmp_path))) != base


def test_a_data_sets_recipe_overrides_count_only_for_the_method_they_adapt(tmp_path):
    """Changing dTPS's override (cluttered MNIST's ``train_overrides.dtps``) re-runs dTPS only; a
    common override re-runs every learned method, never a method that does not train."""
    study = ["model=vit_cmnist", "data=cluttered_mnist"]

    def key(method: str, *changes: str) -> str:
        return config_key(container(compose_config([*study, f"method={method}", *changes], tmp_path)))

    dtps_change = "data.train_overrides.dtps.base_lr=1e-2"
    common_change = "data.train_overrides.batch_size=32"
    for method in ("topk", "none", "tnt", "dynamicvit"):
        assert key(method, dtps_change) == key(method), method
    assert key("dtps", dtps_change) != key("dtps")
    assert key("tnt", common_change) != key("tnt") and key("dtps", common_change) != key("dtps")
    assert key("topk", common_change) == key("topk")


def test_an_index_of_an_older_key_rule_is_rebuilt_and_its_records_still_match(tmp_path, compose_cfg):
    """A store indexed under key rule v3 (its VERSION file says 3) is re-indexed under the current
    rule once, so a sweep finds its v3 records instead of running them again."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg("method=topk", "keep_rate=0.3"), resolve=True, enum_to_str=True)
    old = {"run_id": "v3", "task": "eval", "status": "ok", "config_key": "0123456789abcdef",
           "config_key_version": 3, "config": cfg}  # fmt: skip
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    index = tmp_path / "index"
    (index / "01").mkdir(parents=True)
    (index / "01" / "eval-0123456789abcdef.json").write_text(json.dumps(old))
    (index / "VERSION").write_text("3\n")
    store = ResultsStore(tmp_path)
    assert store.recorded("eval", config_key(cfg))["run_id"] == "v3"
    assert (index / "VERSION").read_text().strip() == str(CONFIG_KEY_VERSION)


def test_training_tasks_keep_the_number_of_training_processes_in_the_key(tmp_path):
    one = compose_config(["task=train", "method=tnt"], tmp_path)
    four = compose_config(["task=train", "method=tnt", "trainer=ddp", "trainer.devices=4"], tmp_path)
    assert config_key(container(one)) != config_key(container(four))
    assert comparable_config(container(four))["trainer"]["world_size"] == 4


def test_a_key_added_later_at_its_neutral_default_leaves_old_keys_unchanged(tmp_path):
    new = container(compose_config(["method=topk"], tmp_path))
    new["data"]["on_bad_image"] = "fail"
    old = json.loads(json.dumps(new))
    del old["data"]["on_bad_image"]
    assert config_key(new) == config_key(old)
    new["data"]["on_bad_image"] = "skip"
    assert config_key(new) != config_key(old)


def container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


KEYS_ADDED_SINCE_V2 = [
    "data.on_bad_image", "data.train_split", "data.val_split", "data.test_split", "data.augment",
    "data.channels", "data.image_size", "model.trust_pickle", "method.trust_pickle",
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=topk"],
        ["data=imagenet", "data.root=/x", "model=deit_small_distilled"],
        ["data=imagefolder", "data.root=/x"],
    ],
)
def test_records_from_before_the_new_data_and_loading_keys_keep_their_key(overrides, tmp_path):
    """A config as the project wrote it before the split, augmentation, bad-image and trust keys
    existed has the key of today's config at their defaults."""
    new = container(compose_config(overrides, tmp_path))
    old = json.loads(json.dumps(new))
    for dotted in KEYS_ADDED_SINCE_V2:
        *parents, leaf = dotted.split(".")
        node = old
        for part in parents:
            node = node[part]
        if not (dotted == "data.image_size" and new["data"]["name"] != "mnist"):  # there before
            node.pop(leaf, None)
    assert config_key(new) == config_key(old)
    new["data"]["augment"] = "none"
    assert config_key(new) != config_key(old)


# ---------------------------------------------------------------------- integrity (issue 27)

HOLDER = """
import json, sys
from tnt_lightning.results import CONFIG_KEY_VERSION, ResultsStore
root, key, attempt = sys.argv[1:4]
store = ResultsStore(root)
admission = store.begin("eval", key, attempt, skip_recorded=True)
print("claimed" if admission.claim else "not claimed", flush=True)
sys.stdin.readline()  # told to finish
store.append({"run_id": attempt, "task": "eval", "status": "ok", "config_key": key,
              "config_key_version": CONFIG_KEY_VERSION, "attempt_id": attempt})
admission.claim.release()
print("recorded", flush=True)
"""


def _holder(root, key: str, attempt: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), key, attempt],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def _age(path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_stopped_jobs_claim_is_never_taken_over_and_doctor_releases_it_on_request(tmp_path, capsys):
    """A job stopped with SIGSTOP (Ctrl-Z) for longer than the heartbeat allows keeps its claim: its
    pid is alive on this host. doctor shows it as stopped and releases it when asked; the job,
    continued, finds its claim gone and its record does not count as the experiment's result."""
    key = "f" * 16
    store = ResultsStore(tmp_path)
    stopped = _holder(tmp_path, key, "stopped")
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        claim = store.claims_dir / f"eval-{key}.json"
        _age(claim, CLAIM_STALE_S + 60)  # no heartbeat for 6 minutes
        second = store.begin("eval", key, "second", skip_recorded=True)
        assert second.claim is None and second.running_elsewhere["attempt_id"] == "stopped"
        assert store.stale_claims() == []
        assert doctor(tmp_path, repair=True) == 0 and claim.exists()  # a repair never releases a live claim
        assert "stopped" in capsys.readouterr().out
        assert doctor(tmp_path, repair=False, release=[key]) == 0 and not claim.exists()
        second = store.begin("eval", key, "second", skip_recorded=True)
        assert second.claim is not None
        store.append(record(2, key=key, attempt_id="second"))
        second.claim.release()
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    out, _ = stopped.communicate("\n", timeout=30)
    assert stopped.returncode == 0 and "recorded" in out
    history = read_records(tmp_path, history=True)
    assert [(r["run_id"], r["status"]) for r in history] == [("run2", "ok"), ("stopped", "claim_lost")]
    assert [r["run_id"] for r in read_records(tmp_path)] == ["run2"]
    assert store.recorded("eval", key)["run_id"] == "run2"
    assert doctor(tmp_path, repair=False) == 0


def test_a_record_written_after_the_claim_was_taken_over_never_counts(tmp_path):
    """The claim is checked again, under the lock, when the record is written: a job whose claim
    another job took over (here: the claim file now names another attempt) records ``claim_lost``,
    which is kept in the history but is never the experiment's current record."""
    key = "c" * 16
    store = ResultsStore(tmp_path)
    first = _holder(tmp_path, key, "first")
    claim = store.claims_dir / f"eval-{key}.json"
    other = {**json.loads(claim.read_text()), "attempt_id": "other", "pid": os.getpid()}
    claim.write_text(json.dumps(other))  # what a takeover leaves
    store.append(record(5, key=key, attempt_id="other"))
    out, _ = first.communicate("\n", timeout=30)
    assert first.returncode == 0
    statuses = [(r["run_id"], r["status"]) for r in read_records(tmp_path, history=True)]
    assert statuses == [("run5", "ok"), ("first", "claim_lost")]
    assert json.loads(claim.read_text())["attempt_id"] == "other"  # the other job's claim is kept
    assert store.recorded("eval", key)["run_id"] == "run5"


def _tear_line(path, number: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[number - 1] = lines[number - 1][: len(lines[number - 1]) // 2] + b"\n"
    path.write_bytes(b"".join(lines))


def test_repair_of_a_torn_ok_line_leaves_no_index_entry_pointing_at_it(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.append(record(1, key="a" * 16))
    store.append(record(2, key="b" * 16))
    _tear_line(store.path, 1)
    assert doctor(tmp_path, repair=False) == 1
    out = capsys.readouterr().out
    assert "line 1" in out and "index" in out and "a" * 16 in out  # the entry without its line
    assert doctor(tmp_path, repair=True) == 0
    assert store.recorded("eval", "a" * 16) is None  # runs again, as read_records and reports say
    assert [r["run_id"] for r in read_records(tmp_path)] == ["run2"]
    assert doctor(tmp_path, repair=False) == 0


def test_an_index_entry_that_disagrees_with_the_view_is_reported_and_repaired(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.append(record(1, key="a" * 16))
    store._write_index("eval", "9" * 16, record(9, key="9" * 16))  # an entry with no line
    assert doctor(tmp_path, repair=False) == 1
    assert "9" * 16 in capsys.readouterr().out
    assert doctor(tmp_path, repair=True) == 0 and store.recorded("eval", "9" * 16) is None
    assert doctor(tmp_path, repair=False) == 0


def _short_writes(monkeypatch, fail_after_first: bool = False):
    """os.write as a full disk or a signal-interrupted write may do it: half of a long buffer."""
    real, calls = os.write, []

    def write(fd, data):
        if len(data) < 200:
            return real(fd, data)
        calls.append(len(data))
        if fail_after_first and len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(os, "write", write)
    return calls


def test_an_append_writes_the_whole_line_through_short_writes(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    calls = _short_writes(monkeypatch)
    for i in range(3):
        store.append(record(i, payload="x" * 5000))
    assert len(calls) > 3 and store.damaged_lines() == []
    assert [r["run_id"] for r in read_records(tmp_path)] == ["run0", "run1", "run2"]


def test_an_append_that_cannot_finish_leaves_nothing_behind(tmp_path, monkeypatch):
    from tnt_lightning.results import StoreError

    store = ResultsStore(tmp_path)
    store.append(record(0))
    before = store.path.read_bytes()
    _short_writes(monkeypatch, fail_after_first=True)
    with pytest.raises(StoreError, match="No space left"):
        store.append(record(1, payload="x" * 5000))
    assert store.path.read_bytes() == before and store.recorded("eval", f"{1:016x}") is None


def test_a_deleted_index_file_and_the_duplicate_it_caused_are_reported_and_repaired(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    store.append(record(1, key="a" * 16))
    store._index_file("eval", "a" * 16).unlink()
    assert doctor(tmp_path, repair=False) == 1
    assert "missing" in capsys.readouterr().out
    again = store.begin("eval", "a" * 16, "again", skip_recorded=True)  # the index says: not recorded
    assert again.claim is not None
    store.append(record(2, key="a" * 16, attempt_id="again"))
    again.claim.release()
    assert doctor(tmp_path, repair=False) == 1
    assert "duplicate" in capsys.readouterr().out
    assert doctor(tmp_path, repair=True) == 0
    assert [r["run_id"] for r in read_records(tmp_path, history=True)] == ["run1"]  # the first stays
    assert store.recorded("eval", "a" * 16)["run_id"] == "run1"
    (aside,) = tmp_path.glob("results.jsonl.duplicates-*")
    assert json.loads(aside.read_text())["run_id"] == "run2"  # kept aside, not lost
    assert doctor(tmp_path, repair=False) == 0


def test_a_deliberate_rerun_is_not_a_duplicate(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(record(1, key="a" * 16))
    store.append(record(2, key="a" * 16, config={"skip_recorded": False}))
    assert doctor(tmp_path, repair=False) == 0


KILLED_SAVE = """
import os, signal, sys
import torch
from tnt_lightning.models import artefact_io
artefact_io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed before the rename
artefact_io.save_artefact({"w": torch.zeros(1000)}, __import__("pathlib").Path(sys.argv[1]))
"""


def test_temporary_files_of_killed_writes_are_removed_by_the_next_write_and_by_doctor(tmp_path):
    from tnt_lightning.models.artefact_io import save_artefact

    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / "head.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL and len(list(cache.glob(".head.pth.*.tmp"))) == 1
    save_artefact({"w": 1}, target)
    assert sorted(p.name for p in cache.iterdir()) == ["head.pth", "head.pth.sha256"]

    subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], env=env, timeout=120)
    store = ResultsStore(tmp_path / "results")
    store.append(record(1))
    index_tmp = store.index_dir / ".VERSION.999999999.tmp"  # a pid that cannot be alive
    index_tmp.write_text("half")
    assert doctor(store.root, repair=False, cache_dir=cache) == 1
    assert doctor(store.root, repair=True, cache_dir=cache) == 0
    assert not list(cache.glob("*.tmp")) and not list(store.root.rglob("*.tmp"))


def test_every_file_of_the_store_honours_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        store = ResultsStore(tmp_path)
        admission = store.begin("eval", "a" * 16, "me", skip_recorded=True)
        claim_mode = stat.S_IMODE(admission.claim.path.stat().st_mode)
        store.append(record(1, key="a" * 16, attempt_id="me"))
        admission.claim.release()
    finally:
        os.umask(old)
    assert claim_mode == 0o640
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / ".store.lock") in files
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o640 for p in files}


KILL_POINTS = ["after_claim", "mid_append", "after_append", "mid_index", "after_index"]

KILLED_JOB = """
import os, signal, sys
from tnt_lightning.results import CONFIG_KEY_VERSION, ResultsStore, store as store_module
root, key, point = sys.argv[1:4]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
store = ResultsStore(root)
admission = store.begin("eval", key, "killed", skip_recorded=True)
if point == "after_claim":
    die()
if point == "mid_append":  # half the line written, then killed
    real = os.write
    store_module.os.write = lambda fd, data: (real(fd, bytes(data)[: len(data) // 2]), die())[0]
if point == "after_append":
    store_module.ResultsStore._write_index = die
if point == "mid_index":  # the index entry's temporary file written, not renamed
    store_module.os.replace = die
store.append({"run_id": "killed", "task": "eval", "status": "ok", "config_key": key,
              "config_key_version": CONFIG_KEY_VERSION, "attempt_id": "killed", "payload": "x" * 1000})
die()  # after_index: before the release
"""


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_job_killed_anywhere_in_its_store_writes_is_recorded_once_and_leaves_nothing(tmp_path, point):
    """The kill matrix: a job SIGKILLed at each point of claim, append, index and release; the next
    run records the experiment exactly once (recovering the killed job's record where it was
    written whole) and cleans what the kill left; doctor finds nothing, except the torn line of a
    write killed midway, which its repair moves aside."""
    key = "e" * 16
    proc = subprocess.run([sys.executable, "-c", KILLED_JOB, str(tmp_path), key, point], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    store = ResultsStore(tmp_path)
    resumed = store.begin("eval", key, "resumed", skip_recorded=True)
    if resumed.claim is not None:
        store.append(record(7, key=key, attempt_id="resumed"))
        resumed.claim.release()
    expected = "run7" if point in ("after_claim", "mid_append") else "killed"
    assert store.recorded("eval", key)["run_id"] == expected
    assert [r["run_id"] for r in read_records(tmp_path, history=True) if r["status"] == "ok"] == [expected]
    assert not list(store.claims_dir.glob("*")) and not list(tmp_path.rglob("*.tmp"))
    assert doctor(tmp_path, repair=False) == (1 if point == "mid_append" else 0)
    assert doctor(tmp_path, repair=True) == 0 and doctor(tmp_path, repair=False) == 0
    assert store.recorded("eval", key)["run_id"] == expected


def test_a_method_whose_code_version_is_bumped_is_a_new_experiment_and_a_new_artefact(tmp_path, monkeypatch):
    """Records and trained artefacts of a changed method are not reused; other methods keep theirs."""
    from hydra.utils import instantiate

    from tnt_lightning.engine import backbone_info
    from tnt_lightning.methods import TNT, TopK, build_reducer
    from tnt_lightning.models import create_model
    from tnt_lightning.models.trained import training_identity
    from tnt_lightning.tasks.inputs import stamp_method_version

    def key(method: str) -> str:
        cfg = compose_config([f"method={method}"], tmp_path)
        stamp_method_version(cfg)
        return config_key(container(cfg))

    def identity() -> dict:
        cfg = compose_config(["method=tnt"], tmp_path)
        spec = instantiate(cfg.model)
        info = backbone_info(create_model(spec))
        reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
        return training_identity(cfg, spec, reducer)

    before = {m: key(m) for m in ("topk", "evit", "tnt")}
    tnt_before = identity()
    monkeypatch.setattr(TopK, "version", 2)
    monkeypatch.setattr(TNT, "version", 2)
    assert key("topk") != before["topk"] and key("tnt") != before["tnt"]
    assert key("evit") == before["evit"]
    assert identity() != tnt_before and identity()["method_version"] == 2
