"""data_reward's data contract: reading, validation messages (file:row), helpers, atomic writes.

Row numbers count as in a spreadsheet: the header is row 1, the first data row is row 2.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so a bare `pytest` finds it
import data_reward  # noqa: E402
import output_files  # noqa: E402
from data_reward import DataError

GOOD = ('row_id,prompt,q_action_0,q_action_1,reward_action_0,reward_action_1\n'
        '0,"Tank empty, load small.",-1.0,-1.5,0.75,0.25\n'
        '1,"Tank full, load large.",-2.0,-1.0,0.2,0.8\n')


def write(tmp_path, text, name="data.csv"):
    """Write text to tmp_path/name exactly (no newline translation) and return the path."""
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def problems_of(paths, **kwargs):
    """Return the lines of the DataError raised by validate_data_files(paths)."""
    with pytest.raises(DataError) as caught:
        data_reward.validate_data_files(paths, **kwargs)
    return str(caught.value).splitlines()


def test_a_valid_file_passes_with_float_q_and_text_elsewhere(tmp_path):
    path = write(tmp_path, GOOD)
    df = data_reward.validate_data_files([path])[path]
    assert df["q_action_1"].tolist() == [-1.5, -1.0]
    assert df["row_id"].tolist() == ["0", "1"]  # not parsed: other columns stay as written


def test_text_that_pandas_would_turn_into_nan_stays_text(tmp_path):
    path = write(tmp_path, "note,prompt,q_action_0\nNA,n/a,1\n")
    df = data_reward.validate_data_files([path], require_rewards=False)[path]
    assert df["note"].tolist() == ["NA"] and df["prompt"].tolist() == ["n/a"]


def test_missing_prompt_column_is_reported_at_the_header_row(tmp_path):
    path = write(tmp_path, "text,q_action_0\nhello,1\n")
    assert problems_of([path]) == [f"{path}:1: no 'prompt' column; the header has text, q_action_0"]


def test_missing_q_columns_are_reported(tmp_path):
    path = write(tmp_path, "prompt,reward_action_0\nhello,1\n")
    assert problems_of([path])[0] == f"{path}:1: no q_action_<i> columns; expected q_action_0, q_action_1, ..."


def test_a_gap_in_the_action_indices_is_reported(tmp_path):
    path = write(tmp_path, "prompt,q_action_0,q_action_2\nhello,1,2\n")
    (line,) = problems_of([path], require_rewards=False)
    assert line.startswith(f"{path}:1: ") and "missing q_action_1" in line


def test_a_non_numeric_q_value_is_reported_with_its_row(tmp_path):
    path = write(tmp_path, GOOD.replace("-1.0,-1.5", "-1.0,abc"))
    assert problems_of([path], require_rewards=False) == [
        f"{path}:2: q_action_1 is 'abc', not a finite number"]


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "", "1,5"])
def test_non_finite_or_empty_q_values_are_reported(tmp_path, bad):
    path = write(tmp_path, GOOD.replace("-2.0,-1.0", f'"{bad}",-1.0'))
    assert problems_of([path], require_rewards=False) == [
        f"{path}:3: q_action_0 is {bad!r}, not a finite number"]


def test_an_empty_prompt_is_reported(tmp_path):
    path = write(tmp_path, GOOD.replace('"Tank full, load large."', '"  "'))
    assert problems_of([path]) == [f"{path}:3: prompt is empty"]


def test_missing_reward_columns_are_reported_when_required(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\nhello,1\n")
    (line,) = problems_of([path])
    assert line.startswith(f"{path}:1: no reward_action_<i> columns") and "calculate_reward.py" in line


def test_missing_reward_columns_are_fine_when_not_required(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\nhello,1\n")
    assert list(data_reward.validate_data_files([path], require_rewards=False)) == [path]


def test_rewards_that_do_not_sum_to_one_are_reported(tmp_path):
    path = write(tmp_path, GOOD.replace("0.2,0.8", "0.2,0.7"))
    (line,) = problems_of([path])
    assert line.startswith(f"{path}:3: reward_action_<i> sum to 0.9, not 1")


def test_rewards_within_the_tolerance_pass(tmp_path):
    path = write(tmp_path, GOOD.replace("0.2,0.8", "0.2,0.8000000005"))
    data_reward.validate_data_files([path])


def test_reward_columns_that_do_not_match_the_q_columns_are_reported(tmp_path):
    text = GOOD.replace(",reward_action_1", "").replace(",0.25\n", "\n").replace(",0.8\n", "\n")
    (line,) = problems_of([write(tmp_path, text)])
    assert "1 reward_action_<i> columns but 2 q_action_<i> columns" in line


def test_several_problems_in_several_files_come_in_one_message(tmp_path):
    first = write(tmp_path, GOOD.replace("-1.0,-1.5", "x,-1.5").replace("0.2,0.8", "0.5,0.8"), "a.csv")
    second = write(tmp_path, GOOD.replace('"Tank empty, load small."', '""'), "b.csv")
    missing = tmp_path / "missing.csv"
    lines = problems_of([first, second, missing])
    assert lines[0] == f"{first}:2: q_action_0 is 'x', not a finite number"
    assert lines[1].startswith(f"{first}:3: reward_action_<i> sum to 1.3")
    assert lines[2] == f"{second}:2: prompt is empty"
    assert lines[3] == f"{missing}: no such file; check the path"
    assert len(lines) == 4


def test_an_action_count_that_differs_between_files_is_reported(tmp_path):
    two = write(tmp_path, GOOD, "two.csv")
    three = write(tmp_path, "prompt,q_action_0,q_action_1,q_action_2,reward_action_0,"
                            "reward_action_1,reward_action_2\nhi,1,2,3,0.2,0.3,0.5\n", "three.csv")
    assert problems_of([two, three]) == [
        f"{three}:1: 3 actions (q_action_<i> columns) but {two} has 2; every file of a run needs "
        "the same actions"]


def test_differing_action_counts_pass_when_allowed(tmp_path):
    two = write(tmp_path, GOOD, "two.csv")
    one = write(tmp_path, "prompt,q_action_0\nhi,1\n", "one.csv")
    data_reward.validate_data_files([two, one], require_rewards=False, same_action_count=False)


def test_a_short_row_is_reported_rather_than_padded(tmp_path):
    path = write(tmp_path, "prompt,q_action_0,note\nhi,1\nyo,2,x\n")
    (line,) = problems_of([path], require_rewards=False)
    assert line.startswith(f"{path}:2: 2 field(s) but the header has 3")


def test_a_blank_line_is_reported(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\nhi,1\n\nyo,2\n")
    (line,) = problems_of([path], require_rewards=False)
    assert line.startswith(f"{path}:3: 1 field(s) but the header has 2")


def test_a_long_first_row_is_reported_rather_than_used_as_an_index(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\nhi,1,extra\n")
    (line,) = problems_of([path], require_rewards=False)
    assert line.startswith(f"{path}:2: 3 field(s) but the header has 2")


def test_an_unclosed_quote_is_reported_with_its_row(tmp_path):
    path = write(tmp_path, 'prompt,q_action_0\nhi,1\n"open,2\n')
    assert problems_of([path], require_rewards=False) == [
        f"{path}:3: a quote character in this row is never closed; fix the quote characters"]


def test_quoted_commas_quotes_and_newlines_count_as_one_field(tmp_path):
    path = write(tmp_path, 'prompt,q_action_0\n"a, ""b""\nc",1\r\nd,2')
    df = data_reward.validate_data_files([path], require_rewards=False)[path]
    assert df["prompt"].tolist() == ['a, "b"\nc', "d"]


@pytest.mark.parametrize("engine", ["c", "pyarrow"])
def test_both_csv_readers_keep_every_text_exactly(tmp_path, monkeypatch, engine):
    if engine == "pyarrow":
        pytest.importorskip("pyarrow")
    monkeypatch.setattr(data_reward, "CSV_ENGINE", engine)
    path = write(tmp_path, '\ufeffprompt,q_action_0,note\r\nNA,1,null\r\n"x\r\ny",2,NaN\r\n'
                           '""" q"", r",3,#N/A\r\n sp ,4,\r\n')
    df = data_reward.read_data_csv(path)
    assert list(df.columns) == ["prompt", "q_action_0", "note"]
    assert df["prompt"].tolist() == ["NA", "x\r\ny", '" q", r', " sp "]
    assert df["note"].tolist() == ["null", "NaN", "#N/A", ""]
    assert df["q_action_0"].tolist() == ["1", "2", "3", "4"]


def test_an_empty_file_is_reported(tmp_path):
    path = write(tmp_path, "")
    assert problems_of([path]) == [f"{path}: file is empty; regenerate it (see data/README.md)"]


def test_a_header_without_rows_is_reported(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\n")
    assert problems_of([path]) == [f"{path}: the header has no data rows below it"]


def test_a_file_that_is_not_utf8_is_reported(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\ncaf\xe9,1\n".encode("latin-1"))
    (line,) = problems_of([path])
    assert line.startswith(f"{path}:2: not valid UTF-8 (byte 21 of the file")
    assert line.endswith("save the file as UTF-8")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path, "\ufeff" + GOOD)
    assert "row_id" in data_reward.validate_data_files([path])[path].columns


def test_duplicate_column_names_are_reported(tmp_path):
    path = write(tmp_path, "prompt,q_action_0,q_action_0\nhi,1,2\n")
    assert problems_of([path])[0].startswith(f"{path}:1: column(s) q_action_0 appear more than once")


def test_a_million_bad_rows_give_a_short_message(tmp_path):
    path = write(tmp_path, "prompt,q_action_0\n" + "hi,x\n" * 100)
    lines = problems_of([path], require_rewards=False)
    assert len(lines) == data_reward.MAX_ROWS_LISTED + 1
    assert lines[-1] == f"{path}: ... and 80 more rows like the above"


def test_find_action_columns_sorts_by_index_not_text():
    columns = ["prompt"] + [f"q_action_{i}" for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)]
    assert data_reward.find_action_columns(columns) == [f"q_action_{i}" for i in range(11)]


def test_find_action_columns_rejects_a_leading_zero_or_a_name():
    with pytest.raises(DataError, match="q_action_01, q_action_best"):
        data_reward.find_action_columns(["q_action_0", "q_action_01", "q_action_best"])


def test_find_action_columns_takes_another_prefix():
    assert data_reward.find_action_columns(["reward_action_1", "reward_action_0", "q_action_0"],
                                           "reward_action_") == ["reward_action_0", "reward_action_1"]


def test_optimal_actions_and_matrices(tmp_path):
    path = write(tmp_path, GOOD)
    df = data_reward.validate_data_files([path])[path]
    assert data_reward.optimal_actions(df).tolist() == [0, 1]
    assert data_reward.q_matrix(df).shape == (2, 2)
    assert np.allclose(data_reward.reward_matrix(df).sum(axis=1), 1.0)


def test_write_csv_atomically_removes_its_temp_file_on_ctrl_c(tmp_path, monkeypatch):
    path = write(tmp_path, GOOD)

    def interrupt(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_files.os, "replace", interrupt)
    df = data_reward.read_data_csv(path)
    with pytest.raises(KeyboardInterrupt):
        output_files.write_csv_atomically(df, path)
    assert path.read_text(encoding="utf-8") == GOOD
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]


def test_write_csv_atomically_keeps_the_file_mode(tmp_path):
    path = write(tmp_path, GOOD)
    path.chmod(0o640)
    output_files.write_csv_atomically(data_reward.read_data_csv(path), path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.read_text(encoding="utf-8") == GOOD
