"""StepStream: the endless, seeded stream of training prompts that feeds TRL's GRPOTrainer.

Each record is one Harmony prompt with what the reward function needs to score any answer to it:

    {"prompt": "<|start|>system...<|start|>assistant", "prompt_id": "<file stem>:<row_id>",
     "action_rewards": [r0, r1, r2, r3], "q_values": [q0, q1, q2, q3], "optimal_action": 2}

- Random but seeded: the pool is walked in epochs; each epoch is a fresh permutation of every prompt, so no prompt
  repeats before the whole pool has been seen.
- Fair across files: within an epoch the files are interleaved in proportion to their size, so any stretch of
  steps draws from each file about as often as its share of the pool.
- Prompts longer than MAX_PROMPT_LEN tokens are left out of the pool, counted and reported by file and row
  (never truncated: a prompt cut mid-Harmony would teach the model on a broken turn).
- TRL 1.x repeats every record `num_generations` times by itself (one GRPO group per prompt), so the stream yields
  each prompt once; the trainer must be told `shuffle_dataset=False` to keep this order.
- Several processes (`accelerate launch`): every process runs this same seeded stream. TRL cuts it into steps of
  (processes x PROMPTS_PER_STEP) prompts, each repeated into its group; accelerate (IterableDatasetShard, as the
  stream is one shard and TRL sets dispatch_batches=False) hands process r the r-th contiguous slice of
  PROMPTS_PER_STEP x NUM_GENERATIONS records of each step. So within a step no prompt is on two processes and every
  group is whole on one process (TRL still gathers all rewards before it computes the group baselines).
"""

import numpy as np
from datasets import IterableDataset

from data_reward import FIRST_DATA_ROW, optimal_actions, q_matrix, reward_matrix


def make_pool(frames, tokenizer=None, max_prompt_len=None):
    """Data frames (one per file, validated) -> (pool records, list of 'file:row: N tokens' for prompts left out).

    `frames` maps a file path to its frame; only rows of the frame are used (filter the split beforehand).
    """
    pool, too_long = [], []
    for path, frame in frames.items():
        stem = str(path).rsplit("/", 1)[-1].removesuffix(".csv")
        prompts = frame["prompt"].tolist()
        lengths = None
        if tokenizer is not None and max_prompt_len:
            lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        rewards, qs, best = reward_matrix(frame), q_matrix(frame), optimal_actions(frame)
        row_ids = frame["row_id"].tolist() if "row_id" in frame else list(range(len(frame)))
        for i, prompt in enumerate(prompts):
            if lengths is not None and lengths[i] > max_prompt_len:
                too_long.append(f"{path}:{frame.index[i] + FIRST_DATA_ROW}: {lengths[i]} tokens")
                continue
            pool.append(
                {
                    "prompt": prompt,
                    "prompt_id": f"{stem}:{row_ids[i]}",
                    "file": stem,
                    "action_rewards": [float(r) for r in rewards[i]],
                    "q_values": [float(q) for q in qs[i]],
                    "optimal_action": int(best[i]),
                }
            )
    return pool, too_long


def order_epoch(files, rng):
    """One epoch's order of pool indices: a permutation of each file, interleaved in proportion to file size.

    `files` is the file name of every pool record. Record k of a file with n records is placed at (k + u) / n
    on a common 0..1 axis (u a random offset per file), and the epoch is read off that axis in order.
    """
    files = np.asarray(files)
    keys = np.empty(len(files))
    order = np.empty(len(files), dtype=np.int64)
    for name in sorted(set(files.tolist())):
        members = np.flatnonzero(files == name)
        members = members[rng.permutation(len(members))]
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    order[:] = np.lexsort((files, keys))
    return order


class StepStream:
    """An endless iterator over pool records: epoch after epoch, each a fresh fair permutation (see module doc)."""

    def __init__(self, pool, seed=0):
        if not pool:
            raise ValueError("StepStream got no prompts: every prompt was left out or the data files are empty")
        self.pool, self.seed = pool, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        files = [record["file"] for record in self.pool]
        while True:
            for index in order_epoch(files, rng):
                yield self.pool[index]

    def as_dataset(self):
        """The stream as a `datasets.IterableDataset`, the form GRPOTrainer accepts (it rejects torch's)."""
        return IterableDataset.from_generator(iterate_stream, gen_kwargs={"stream": self})


def iterate_stream(stream):
    yield from stream
