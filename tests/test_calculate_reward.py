"""calculate_reward.py: reward columns written, everything else kept byte for byte, bad input refused.

Most tests call main(argv) on temporary copies (fast); one runs the real command in a subprocess.
"""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so a bare `pytest` finds the modules
import calculate_reward  # noqa: E402
import data_reward  # noqa: E402
import output_files  # noqa: E402

# quoted commas, a doubled quote, a newline inside a prompt and numbers written in odd ways:
# all of it must come back exactly as written
TOY = ('row_id,prompt,q_action_0,q_action_1,q_action_2,q_action_3,note\n'
       '0,"Tank empty, load small.",-46.608761,-46.855233,-46.682261,-46.617949,  x \n'
       '1,"He said ""charge"", then\nleft.",1E0,2.50,0.0,-0.0,\n'
       '2,plain,3,3,3,3,007\n')


def write(directory, text, name="data.csv"):
    """Write text (str or bytes) to directory/name exactly, and return the path."""
    path = directory / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def run_main(*argv):
    return calculate_reward.main([str(arg) for arg in argv])


def read(path):
    return data_reward.validate_data_files([path])[path]


def test_writes_rewards_that_are_the_softmax_of_q(tmp_path):
    path = write(tmp_path, TOY)
    assert run_main(path, "--tau", "0.05") == 0
    df = read(path)
    expected = data_reward.boltzmann_rewards(data_reward.q_matrix(df), 0.05)
    assert np.allclose(data_reward.reward_matrix(df), expected, rtol=1e-9, atol=1e-12)
    assert list(df.columns[-4:]) == [f"reward_action_{i}" for i in range(4)]


def test_written_rewards_sum_to_one_within_the_tolerance(tmp_path):
    path = write(tmp_path, TOY)
    run_main(path, "--tau", "0.05")
    sums = data_reward.reward_matrix(read(path)).sum(axis=1)
    assert np.abs(sums - 1).max() < 1e-9


def test_every_other_byte_and_the_row_order_are_kept(tmp_path):
    path = write(tmp_path, TOY)
    run_main(path, "--tau", "0.05")
    before, _ = data_reward.split_records(TOY, path)
    after, endings = data_reward.split_records(path.read_text(encoding="utf-8"), path)
    assert [body.rsplit(",", 4)[0] for body in after] == before
    assert endings == ["\n"] * 4


def test_crlf_endings_a_bom_and_a_missing_final_newline_survive(tmp_path):
    text = "\ufeff" + TOY.replace(",\n", ",\r\n").rstrip("\n")
    path = write(tmp_path, text)
    run_main(path, "--tau", "0.05")
    after = path.read_bytes().decode("utf-8")
    assert after.startswith("\ufeffrow_id,")
    assert after.count("\r\n") == text.count("\r\n")
    assert not after.endswith("\n")
    assert after.split(",reward_action_0")[0] == text.split("\n")[0]


def test_without_overwrite_a_file_with_rewards_stays_byte_identical(tmp_path, capsys):
    path = write(tmp_path, TOY)
    run_main(path, "--tau", "0.05")
    before = path.read_bytes()
    assert run_main(path, "--tau", "0.5") == 0
    assert path.read_bytes() == before
    assert "left untouched" in capsys.readouterr().out


def test_overwrite_recomputes_rewards_without_adding_columns(tmp_path):
    path = write(tmp_path, TOY)
    run_main(path, "--tau", "0.05")
    assert run_main(path, "--tau", "0.5", "--overwrite") == 0
    df = read(path)
    assert sum(name.startswith("reward_action_") for name in df.columns) == 4
    expected = data_reward.boltzmann_rewards(data_reward.q_matrix(df), 0.5)
    assert np.allclose(data_reward.reward_matrix(df), expected, rtol=1e-9)


def test_overwrite_with_the_same_tau_gives_the_same_bytes(tmp_path):
    path = write(tmp_path, TOY)
    run_main(path, "--tau", "0.05")
    once = path.read_bytes()
    run_main(path, "--tau", "0.05", "--overwrite")
    assert path.read_bytes() == once


def test_overwrite_moves_reward_columns_from_the_middle_to_the_end(tmp_path):
    path = write(tmp_path, "prompt,reward_action_0,q_action_0,reward_action_1,q_action_1\n"
                           '"a, b",9,1.0,9,2.0\n')
    run_main(path, "--tau", "1", "--overwrite")
    header, row = path.read_text(encoding="utf-8").splitlines()
    assert header == "prompt,q_action_0,q_action_1,reward_action_0,reward_action_1"
    assert row.startswith('"a, b",1.0,2.0,')


def test_a_failure_while_replacing_keeps_the_original_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = write(tmp_path, TOY)

    def interrupted(source, target):
        raise KeyboardInterrupt  # Ctrl-C between writing the temp file and the rename

    monkeypatch.setattr(output_files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_main(path, "--tau", "0.05")
    assert path.read_bytes() == TOY.encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]


def test_a_failure_halfway_through_writing_leaves_no_temp_file(tmp_path, monkeypatch):
    path = write(tmp_path, TOY)

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output_files.os, "fsync", disk_full)
    assert run_main(path, "--tau", "0.05") == 2  # a message, not a traceback
    assert path.read_bytes() == TOY.encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]


@pytest.mark.parametrize("n_actions", [1, 3, 6])
def test_any_number_of_actions_gets_as_many_reward_columns(tmp_path, n_actions):
    q_names = ",".join(f"q_action_{i}" for i in range(n_actions))
    rows = "".join(f"row {r},{','.join(str(r * i / 10) for i in range(n_actions))}\n"
                   for r in range(3))
    path = write(tmp_path, f"prompt,{q_names}\n{rows}")
    run_main(path, "--tau", "0.05")
    rewards = data_reward.reward_matrix(read(path))
    assert rewards.shape == (3, n_actions)
    assert np.allclose(rewards.sum(axis=1), 1.0)


def test_actions_are_ordered_by_index_not_by_column_position(tmp_path):
    path = write(tmp_path, "q_action_1,prompt,q_action_0\n0.0,p,1.0\n")
    run_main(path, "--tau", "1")
    rewards = data_reward.reward_matrix(read(path))[0]
    assert rewards[0] == pytest.approx(math.e / (1 + math.e))


def test_a_directory_gets_every_csv_in_it_but_not_in_subdirectories(tmp_path):
    first, second = write(tmp_path, TOY, "a.csv"), write(tmp_path, TOY, "b.csv")
    (tmp_path / "nested").mkdir()
    nested = write(tmp_path / "nested", TOY, "c.csv")
    write(tmp_path, "not a csv", "notes.txt")
    assert run_main(tmp_path, "--tau", "0.05") == 0
    assert "reward_action_0" in first.read_text() and "reward_action_0" in second.read_text()
    assert nested.read_text() == TOY


def test_one_bad_file_in_a_directory_stops_every_write(tmp_path):
    good = write(tmp_path, TOY, "a.csv")
    write(tmp_path, TOY.replace("1E0", "oops"), "b.csv")
    assert run_main(tmp_path, "--tau", "0.05") == 2
    assert good.read_text() == TOY


BAD_FILES = {
    "empty CSV": "",
    "header without rows": "prompt,q_action_0,q_action_1\n",
    "no prompt column": "text,q_action_0\nhi,1\n",
    "no q columns": "prompt,value\nhi,1\n",
    "NaN in Q": "prompt,q_action_0,q_action_1\nhi,1,nan\n",
    "inf in Q": "prompt,q_action_0,q_action_1\nhi,1,-inf\n",
    "text in Q": "prompt,q_action_0,q_action_1\nhi,1,high\n",
    "empty Q": "prompt,q_action_0,q_action_1\nhi,1,\n",
    "short row": "prompt,q_action_0,q_action_1\nhi,1\n",
    "unclosed quote": 'prompt,q_action_0,q_action_1\n"hi,1,2\n',
    "not UTF-8": "prompt,q_action_0,q_action_1\ncaf\xe9,1,2\n".encode("latin-1"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_exits_2_names_the_file_and_is_not_touched(tmp_path, capsys, case):
    path = write(tmp_path, BAD_FILES[case])
    before = path.read_bytes()
    assert run_main(path, "--tau", "0.05") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]


def test_the_row_of_a_bad_q_value_is_named_as_a_spreadsheet_counts_it(tmp_path, capsys):
    # line 5 in an editor (the prompt above spans two lines) but the fourth record: row 4
    path = write(tmp_path, TOY.replace("3,3,3,3", "3,3,x,3"))
    run_main(path, "--tau", "0.05")
    assert capsys.readouterr().err == f"error: {path}:4: q_action_2 is 'x', not a finite number\n"


@pytest.mark.parametrize("tau", ["0", "-0.05", "nan", "inf"])
def test_a_tau_that_is_not_finite_and_positive_exits_2_before_touching_files(tmp_path, capsys, tau):
    path = write(tmp_path, TOY)
    assert run_main(path, "--tau", tau) == 2
    assert "--tau" in capsys.readouterr().err
    assert path.read_text() == TOY


def test_a_missing_path_exits_2(tmp_path, capsys):
    assert run_main(tmp_path / "nope.csv", "--tau", "0.05") == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nope.csv'}: no such file")


def test_a_directory_without_csv_files_exits_2(tmp_path, capsys):
    write(tmp_path, "x", "notes.txt")
    assert run_main(tmp_path, "--tau", "0.05") == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: directory has no *.csv files")


def test_the_command_line_reports_on_stderr_with_exit_status_2(tmp_path):
    path = write(tmp_path, TOY.replace("1E0", "inf"))
    done = subprocess.run([sys.executable, str(REPO / "calculate_reward.py"), str(path),
                           "--tau", "0.05"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"error: {path}:3: q_action_0 is 'inf', not a finite number\n"
    assert done.stdout == ""
    assert path.read_text() == TOY.replace("1E0", "inf")


def test_a_directory_that_cannot_be_written_is_refused_and_the_file_kept(tmp_path, make_read_only, capsys):
    directory = tmp_path / "data"
    directory.mkdir()
    path = write(directory, TOY)
    make_read_only(directory)
    assert run_main(path, "--tau", "0.05") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot be written" in err
    assert path.read_text() == TOY


def test_a_prompt_holding_a_nul_byte_is_refused_and_the_file_not_rewritten(tmp_path, capsys):
    path = write(tmp_path, TOY.replace("2,plain,", "2,pla\x00in,"))
    before = path.read_bytes()
    assert run_main(path, "--tau", "0.05") == 2
    assert capsys.readouterr().err == f"error: {path}:4: prompt holds the control character U+0000; remove it from " \
                                      "the text\n"
    assert path.read_bytes() == before
