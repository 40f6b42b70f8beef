"""completion_log.CompletionLog: the rank column, and logs written before it still read and continued."""

import csv
from types import SimpleNamespace

from training.completion_log import COMPLETION_LOG_COLUMNS, CompletionLog

RANKLESS = "step,micro_step,prompt_id,completion,parsed_action,reward,optimal_action\n"


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_one_process_writes_its_rows_with_rank_0(tmp_path):
    log = CompletionLog(tmp_path / "completions.csv")
    log.write_batch(SimpleNamespace(global_step=4), ["tes:1", "tes:1"], ["<|channel|>final<|message|>[2]", "x"],
                    [2, None], [0.5, None], [2, 2])
    header, *rows = read(tmp_path / "completions.csv")
    assert header == COMPLETION_LOG_COLUMNS and header[2] == "rank"
    assert rows == [["5", "5", "0", "tes:1", "<|channel|>final<|message|>[2]", "2", "0.500000", "2"],
                    ["5", "5", "0", "tes:1", "x", "", "", "2"]]


def test_a_log_written_before_the_rank_column_is_read_with_an_empty_rank(tmp_path):
    path = tmp_path / "completions.csv"
    path.write_text(RANKLESS + "1,1,tes:3,a,1,0.250000,2\n2,2,tes:4,b,,,0\n", encoding="utf-8")
    rows, torn = CompletionLog(path).read_rows()
    assert not torn
    assert rows == [["1", "1", "", "tes:3", "a", "1", "0.250000", "2"], ["2", "2", "", "tes:4", "b", "", "", "0"]]


def test_resuming_a_log_written_before_the_rank_column_continues_it_with_the_column(tmp_path):
    path = tmp_path / "completions.csv"
    path.write_text(RANKLESS + "1,1,tes:3,a,1,0.250000,2\n2,2,tes:4,b,,,0\n3,3,tes:5,\"cut off", encoding="utf-8")
    log = CompletionLog(path)
    assert log.keep_steps_up_to(1) == (1, True)  # step 2 is generated again; the torn record goes
    log.write_batch(SimpleNamespace(global_step=1), ["tes:4"], ["b"], [None], [None], [0])
    header, *rows = read(path)
    assert header == COMPLETION_LOG_COLUMNS
    assert rows == [["1", "1", "", "tes:3", "a", "1", "0.250000", "2"], ["2", "2", "0", "tes:4", "b", "", "", "0"]]
    assert log.read_rows() == (rows, False)
