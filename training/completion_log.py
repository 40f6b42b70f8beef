"""completions.csv: every sampled completion of a run with its step, process rank, prompt, parsed action and reward,
appended as TRL scores them and cut back to whole records when a run resumes."""

import csv
import io
import os
import re

from accelerate import PartialState
from accelerate.utils import gather_object

from data_reward import FIRST_DATA_ROW, DataError
from output_files import write_text_atomically

COMPLETION_LOG_COLUMNS = ["step", "micro_step", "rank", "prompt_id", "completion", "parsed_action", "reward",
                          "optimal_action"]
# the columns of a log written before several processes could train (no rank): still read, and continued by --resume
RANKLESS_LOG_COLUMNS = [name for name in COMPLETION_LOG_COLUMNS if name != "rank"]


class CompletionLog:
    """Appends every scored completion to a CSV that survives a crash: header once, each batch flushed to disk.

    `step` is the optimiser step the completion trains, counted from 1 like TensorBoard and the checkpoints
    (trainer_state.global_step + 1 while it is generated), and `micro_step` the first micro-batch it feeds, also
    from 1: global_step * steps_per_generation + 1, where steps_per_generation (GRPO_STEPS_PER_GENERATION) is the
    number of micro-batches one generation serves (= gradient accumulation steps by default).
    `rank` is the process that generated and scored the completion (0 with one process). Under `accelerate launch`
    every process scores its own completions; their rows are gathered to the main process, which alone writes the
    file: one writer, so no record is ever interleaved with another process's and a kill can cut off at most the
    last record, as with one process. A log written before the rank column existed is read with an empty rank.
    A batch is several writes: a kill can leave its last record cut off, which `keep_steps_up_to` removes.
    """

    def __init__(self, path, steps_per_generation=1):
        self.path, self.steps_per_generation = str(path), int(steps_per_generation)

    def write_batch(self, trainer_state, prompt_ids, completions, actions, rewards, optimal):
        state = PartialState()
        done = trainer_state.global_step if trainer_state is not None else 0
        rows = [[done + 1, done * self.steps_per_generation + 1, state.process_index,
                 prompt_ids[i] if prompt_ids else "", text, "" if actions[i] is None else actions[i],
                 "" if rewards[i] is None else f"{rewards[i]:.6f}", optimal[i] if optimal else ""]
                for i, text in enumerate(completions)]
        if state.num_processes > 1:
            rows = gather_object(rows)  # every process calls this for each batch; rows come back in process order
        if not state.is_main_process:
            return
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(COMPLETION_LOG_COLUMNS)
            for row in rows:
                writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def read_rows(self):
        """(rows as lists of text, whether a last record cut off by a kill was left out); header not included.

        A log written before steps counted from 1 (its first step is 0) is renumbered, and one written before the
        rank column gets an empty rank. Raises DataError for a record in the middle of the file that does not have
        the log's columns (damage a kill cannot cause).
        """
        with open(self.path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")  # a kill can cut a character in two, at the end
        end = complete_records_end(text)
        records = list(csv.reader(io.StringIO(text[:end], newline="")))
        torn = end < len(text)
        if not records:
            return [], torn  # at most a part of the header
        if records[0] not in (COMPLETION_LOG_COLUMNS, RANKLESS_LOG_COLUMNS):
            raise DataError(f"{self.path}:1: not a completion log (its header is {','.join(records[0])}); move "
                            "it aside, or set GRPO_COMPLETION_LOG_PATH to another file")
        header, rows = records[0], records[1:]
        for number, row in enumerate(rows, start=FIRST_DATA_ROW):
            if len(row) != len(header):
                raise DataError(f"{self.path}:{number}: {len(row)} fields, a completion log row has "
                                f"{len(header)}; the log is damaged, move it aside to continue")
        if header == RANKLESS_LOG_COLUMNS:
            rows = [row[:2] + [""] + row[2:] for row in rows]
        if rows and min(int(row[0]) for row in rows) == 0:
            for row in rows:
                row[0], row[1] = str(int(row[0]) + 1), str(int(row[1]) + 1)
        return rows, torn

    def keep_steps_up_to(self, step):
        """Forget rows of steps after `step` (a resumed run generates them again) and a record cut off by a kill.

        Rewrites the log atomically (with the rank column, also a log written before it); returns (rows dropped,
        whether a cut-off record was dropped).
        """
        if not os.path.exists(self.path):
            return 0, False
        rows, torn = self.read_rows()
        keep = [row for row in rows if int(row[0]) <= step]
        buffer = io.StringIO(newline="")
        csv.writer(buffer).writerows([COMPLETION_LOG_COLUMNS, *keep])
        write_text_atomically(buffer.getvalue(), self.path)
        return len(rows) - len(keep), torn


def complete_records_end(text):
    """Length of the part of CSV text up to the end of its last complete record: a line break outside quotes."""
    end, inside = 0, False
    for match in re.finditer(r'["\n]', text):
        if match[0] == '"':
            inside = not inside
        elif not inside:
            end = match.end()
    return end
