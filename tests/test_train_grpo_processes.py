"""train_grpo.py in several processes (data parallel), as `accelerate launch --num_processes N` runs it: here 2 CPU
processes with gloo, started by torchrun (accelerate's own CPU launcher starts one process unless MPI is set up).

Each process trains on its own prompts, every GRPO group whole on one process; the completion log holds every
process's completions once, with their rank; what is not a checkpoint part is written by the main process alone;
a kill and --resume lose and duplicate no log row.
"""

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
# one thread per process: two processes of two threads each on 2 cores spin-wait and run ~50x slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SHORT = ["--tiny", "--total-steps", "3", "--save-steps", "2", "--eval-samples", "1", "--eval-max-prompts", "4",
         "--validation-prompts", "4", "--validation-samples", "1", "--report-to", "none"]
# Runs train_grpo.main in each launched process, and records in WRITES.<rank> what that process wrote: the files
# written through output_files.write_text_atomically, 'adapter' for the final adapter, and 'log row <step>' for every
# completion-log record. With KILL_AT=log:N the main process dies halfway through a completion-log record of step N.
LAUNCHED = """
import csv, os, signal, sys
sys.path.insert(0, {root!r})
import output_files  # patched before the modules that import its functions are imported

rank, writes = os.environ["RANK"], os.environ["WRITES"]
def record(what):
    with open(f"{{writes}}.{{rank}}", "a") as f:
        f.write(what + "\\n")

write_text = output_files.write_text_atomically
def recorded_write_text(text, path):
    record(os.path.basename(str(path)))
    write_text(text, path)
output_files.write_text_atomically = recorded_write_text
from training import run_directory
save_final = run_directory.save_final_atomically
def recorded_save_final(*args, **kwargs):
    record("adapter")
    save_final(*args, **kwargs)
run_directory.save_final_atomically = recorded_save_final

kill_step = os.environ["KILL_AT"].split(":")[1] if os.environ.get("KILL_AT") else None
make_writer = csv.writer
class RecordingWriter:
    def __init__(self, f, *args, **kwargs):
        self.f, self.writer = f, make_writer(f, *args, **kwargs)
    def writerow(self, row):
        if str(row[0]) == kill_step and rank == "0":
            self.f.write(",".join(str(x) for x in row)[:60])
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if str(row[0]).isdigit():
            record(f"log row {{row[0]}}")
        return self.writer.writerow(row)
    def writerows(self, rows):
        for row in rows:
            self.writerow(row)
csv.writer = RecordingWriter

import train_grpo
train_grpo.main(sys.argv[1:])
"""


def launch(tmp_path, *args, kill_at=None, name="writes"):
    """torchrun, 2 processes, train_grpo.main with `args`; returns (result, {rank: [what it wrote]})."""
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED.format(root=str(ROOT)))
    writes = tmp_path / name
    env = {**ENV, "WRITES": str(writes), **({"KILL_AT": kill_at} if kill_at else {})}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={PROCESSES}", str(script), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env=env)
    written = {rank: (Path(f"{writes}.{rank}").read_text().splitlines() if Path(f"{writes}.{rank}").exists() else [])
               for rank in range(PROCESSES)}
    return result, written


def read_log(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def expected_prompt_ids(count, seed=42):
    """The first `count` prompt ids of the StepStream that train_grpo.py builds from the training split."""
    import train_grpo
    from step_stream import StepStream, make_pool
    from tiny_gpt_oss import load_tiny_tokenizer

    settings = {name: getattr(train_grpo, name) for name in train_grpo.SETTINGS} | train_grpo.TINY_SETTINGS
    train_frames, _ = train_grpo.read_data(settings)
    pool, _ = make_pool(train_frames, load_tiny_tokenizer(), settings["MAX_PROMPT_LEN"])
    return [record["prompt_id"] for record in itertools.islice(iter(StepStream(pool, seed=seed)), count)]


def check_groups(rows, steps, prompts, generations):
    """Every step: each process's rows are `prompts` whole groups of `generations` rows, no prompt on two processes."""
    for step in range(1, steps + 1):
        by_rank = {rank: [r["prompt_id"] for r in rows if int(r["step"]) == step and r["rank"] == str(rank)]
                   for rank in range(PROCESSES)}
        for ids in by_rank.values():
            assert len(ids) == prompts * generations
            groups = [ids[i:i + generations] for i in range(0, len(ids), generations)]
            assert all(len(set(group)) == 1 for group in groups), groups  # a group is one prompt, whole
            assert len({group[0] for group in groups}) == prompts
        assert not set(by_rank[0]) & set(by_rank[1])  # no prompt on both processes within a step


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("processes")
    out = tmp_path / "run"
    result, written = launch(tmp_path, *SHORT, "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, written


def test_the_stream_gives_each_process_its_own_slice_of_whole_groups():
    """TRL's repetition and accelerate's sharding of an iterable dataset, applied to StepStream as the trainer does."""
    from accelerate.data_loader import IterableDatasetShard
    from trl.trainer.utils import repeat_iterable_dataset

    from step_stream import StepStream

    pool = [{"prompt": f"prompt {name}{i}", "prompt_id": f"{name}:{i}", "file": name, "action_rewards": [0.4, 0.6],
             "q_values": [0.0, 1.0], "optimal_action": 1} for name, size in (("a", 40), ("b", 20)) for i in range(size)]
    prompts, generations, steps = 3, 4, 5
    dataset = StepStream(pool, seed=0).as_dataset()
    assert dataset.n_shards < PROCESSES  # else accelerate would shard the stream by its files, not by steps
    repeated = repeat_iterable_dataset(dataset, mini_repeat_count=generations, batch_size=PROCESSES * prompts)
    slices = [list(itertools.islice(iter(IterableDatasetShard(repeated, batch_size=prompts * generations,
                                                              num_processes=PROCESSES, process_index=rank)),
                                    steps * prompts * generations)) for rank in range(PROCESSES)]
    rows = [{"step": str(i // (prompts * generations) + 1), "rank": str(rank), "prompt_id": record["prompt_id"]}
            for rank, records in enumerate(slices) for i, record in enumerate(records)]
    check_groups(rows, steps, prompts, generations)
    # together the processes walk the one stream in its order, PROMPTS_PER_STEP prompts after another
    order = [record["prompt_id"] for record in itertools.islice(iter(StepStream(pool, seed=0)), steps * PROCESSES
                                                                * prompts)]
    walked = [slices[rank][i * prompts * generations + k * generations]["prompt_id"]
              for i in range(steps) for rank in range(PROCESSES) for k in range(prompts)]
    assert walked == order


def test_each_process_trains_on_its_own_prompts_in_whole_groups(two_processes):
    import train_grpo

    out, _, _ = two_processes
    rows = read_log(out / "completions.csv")
    prompts, generations = train_grpo.TINY_SETTINGS["PROMPTS_PER_STEP"], train_grpo.TINY_SETTINGS["NUM_GENERATIONS"]
    check_groups(rows, 3, prompts, generations)
    # the two processes trained on the stream's first 3 x 2 x 8 prompts, in its order, none twice
    logged = [r["prompt_id"] for r in rows][::generations]
    assert logged == expected_prompt_ids(3 * PROCESSES * prompts)


def test_the_log_holds_every_completion_of_every_process_once_with_its_rank(two_processes):
    import train_grpo

    out, _, written = two_processes
    rows = read_log(out / "completions.csv")
    assert list(rows[0]) == ["step", "micro_step", "rank", "prompt_id", "completion", "parsed_action", "reward",
                             "optimal_action"]
    prompts, generations = train_grpo.TINY_SETTINGS["PROMPTS_PER_STEP"], train_grpo.TINY_SETTINGS["NUM_GENERATIONS"]
    assert len(rows) == 3 * PROCESSES * prompts * generations  # steps x processes x prompts x generations
    for step in (1, 2, 3):
        ranks = [r["rank"] for r in rows if int(r["step"]) == step]
        assert ranks == ["0"] * prompts * generations + ["1"] * prompts * generations
    # one writer: the main process wrote every record, the other none
    assert written[0].count("log row 1") == PROCESSES * prompts * generations
    assert not [line for line in written[1] if line.startswith("log row")]


def test_the_main_process_alone_writes_the_run_files_and_prints(two_processes):
    out, result, written = two_processes
    assert sorted(set(written[0]) - {f"log row {step}" for step in (1, 2, 3)}) == \
        ["adapter", "run_config.json", "summary.json", "summary.md", "validation.json"]
    assert written[0].count("summary.json") == 1 and written[0].count("adapter") == 1
    assert written[1] == []
    lines = result.stdout.splitlines()
    assert lines.count("2 processes x 8 prompts x 4 answers = 64 completions per step") == 1  # the start line
    assert result.stdout.count("step     3/3") == 1 and result.stdout.count("validation at step 2:") == 1
    assert result.stdout.count("held-out evaluation: trained policy") == 1
    assert result.stdout.count("# GRPO run") == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial checkpoint or adapter left


def test_the_summary_reports_the_processes_and_the_completions_per_step(two_processes):
    out, _, _ = two_processes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == PROCESSES and summary["prompts_per_step"] == 16
    assert summary["completions_per_step"] == 64 and summary["held_out"]["prompts"] == 4
    assert summary["speed"]["completions_per_second"] > 0
    assert "2 processes x 8 prompts x 4 answers = 64 completions per step" in (out / "summary.md").read_text()
    assert json.loads((out / "run_config.json").read_text())["PROCESSES"] == PROCESSES


def test_a_checkpoint_holds_the_random_state_of_every_process(two_processes):
    out, _, _ = two_processes
    names = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "adapter_model.safetensors"} <= names


def test_a_run_is_resumed_only_by_as_many_processes_as_trained_it(two_processes):
    out, _, _ = two_processes
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, "train_grpo.py", "--resume", "--out", str(out), "--total-steps", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0
    assert "was trained by 2 process(es), this launch has 1" in result.stderr
    assert "accelerate launch --num_processes 2 train_grpo.py --resume" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_kill_and_resume_with_two_processes_lose_and_duplicate_no_log_row(tmp_path):
    import train_grpo

    out = tmp_path / "killed"
    args = ["--tiny", "--total-steps", "4", "--save-steps", "1", "--eval-samples", "0", "--validation-prompts", "0",
            "--report-to", "none", "--out", str(out)]
    killed, _ = launch(tmp_path, *args, kill_at="log:3", name="killed")
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (out / "completions.csv").read_text().endswith("\n")  # the kill tore the last record
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    result, _ = launch(tmp_path, "--resume", "--out", str(out), name="resumed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from checkpoint-2" in result.stdout and "a last record cut off by a kill" in result.stdout
    rows = read_log(out / "completions.csv")
    prompts, generations = train_grpo.TINY_SETTINGS["PROMPTS_PER_STEP"], train_grpo.TINY_SETTINGS["NUM_GENERATIONS"]
    assert len(rows) == 4 * PROCESSES * prompts * generations
    assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows)
    check_groups(rows, 4, prompts, generations)
    # the resumed steps go on where the stream stopped: 4 x 16 different prompts, as without the kill
    assert [r["prompt_id"] for r in rows][::generations] == expected_prompt_ids(4 * PROCESSES * prompts)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert not list(out.glob(".*"))


def test_the_two_gpu_accelerate_config_is_read_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(ROOT / "accelerate_2gpu.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 2 and config.num_machines == 1 and config.mixed_precision == "bf16"


def test_batch_line_counts_prompts_per_process():
    from training import run_summary

    assert run_summary.describe_batch(2, 4, 8) == "2 processes x 4 prompts x 8 answers = 64 completions per step"
    assert run_summary.describe_batch(1, 8, 4) == "1 process x 8 prompts x 4 answers = 32 completions per step"
