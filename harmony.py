"""Harmony, the chat format of gpt-oss: the prompt we render and the answer we expect.

One place for what every script must agree on:
- the original gpt-oss chat template (it ships inside the trl package, so it works offline),
- the developer instructions that tell the model how to answer (one bracketed action in the final message),
- the Harmony special tokens and their ids in the real o200k_harmony vocabulary,
- `render_prompt`, which turns a legacy-text situation into the Harmony prompt a model continues,
- `format_answer`, the Harmony text of a well-formed answer (used to warm-start the stand-in model).

A rendered prompt ends with `<|start|>assistant`; a well-formed answer continues it as
`<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>[2]<|return|>`.
"""

import datetime
import importlib.resources
import re
import unicodedata

# The gpt-oss template stamps "Current date: YYYY-MM-DD" into the system message.
DATE_LINE = re.compile(r"Current date: \d{4}-\d{2}-\d{2}")

REASONING_EFFORTS = ("low", "medium", "high")

# What the model is told to do. The prompt itself only describes the situation and lists the actions.
DEVELOPER_INSTRUCTIONS = (
    "You operate the cold-storage tank of a building's cooling plant so that the electricity it uses "
    "emits as little CO2 as possible. Read the situation, think briefly, then give your decision in the "
    "final message as exactly one of the listed actions, written as its number in square brackets, "
    "for example [1]. Write nothing else in the final message."
)

# Harmony special tokens with their ids in the real gpt-oss vocabulary (o200k_harmony, 201088 entries).
# The stand-in for the 20b shape keeps exactly these ids; the tiny stand-in numbers them after its own vocabulary.
SPECIAL_TOKEN_IDS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
    "<|reserved_200013|>": 200013,
    "<|reserved_200014|>": 200014,
    "<|reserved_200015|>": 200015,
    "<|reserved_200016|>": 200016,
    "<|reserved_200017|>": 200017,
    "<|endofprompt|>": 200018,
}
# Generation stops at any of these (as in the real gpt-oss generation_config.json).
STOP_TOKENS = ("<|return|>", "<|endoftext|>", "<|call|>")

FINAL_HEADER = "<|channel|>final<|message|>"
ANALYSIS_HEADER = "<|channel|>analysis<|message|>"


def stop_token_ids(tokenizer):
    """The token ids of STOP_TOKENS in `tokenizer`: where every generation of this project stops."""
    return [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]


def load_chat_template():
    """The original gpt-oss chat template, as shipped inside trl (no Hub access needed)."""
    return (importlib.resources.files("trl") / "chat_templates" / "gptoss.jinja").read_text(encoding="utf-8")


def parse_date(text):
    """`--date` value -> 'YYYY-MM-DD'; 'today' (the default) means the local date, as the template itself does."""
    if text in (None, "today"):
        return datetime.date.today().isoformat()
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"--date {text!r} is not a date: use YYYY-MM-DD (e.g. 2025-08-05) or 'today'") from None


def render_prompt(tokenizer, prompt, reasoning_effort="low", date=None):
    """Legacy-text situation -> Harmony prompt text (system + developer instructions + user turn + assistant start).

    `date` pins the system message's 'Current date' (reproducible files need it); None keeps today's date.
    """
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort {reasoning_effort!r} is not one of {', '.join(REASONING_EFFORTS)}")
    messages = [{"role": "developer", "content": DEVELOPER_INSTRUCTIONS}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, reasoning_effort=reasoning_effort
    )
    if date is not None:
        text, count = DATE_LINE.subn(f"Current date: {parse_date(date)}", text, count=1)
        if count != 1:
            raise ValueError("the chat template has no 'Current date:' line to pin: is it the gpt-oss template?")
    return text


def format_answer(analysis, action):
    """The Harmony continuation of a rendered prompt for a well-formed answer choosing `action`."""
    return f"{ANALYSIS_HEADER}{analysis}<|end|><|start|>assistant{FINAL_HEADER}[{action}]<|return|>"


# Any Harmony marker as text: the tokenizer encodes it as a special token wherever it stands
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")
# A rendered prompt, exactly: one system, one developer and one user message, ending where the assistant starts
RENDERED_PROMPT = re.compile(r"<\|start\|>system<\|message\|>(?P<system>.*?)<\|end\|>"
                             r"<\|start\|>developer<\|message\|>(?P<developer>.*?)<\|end\|>"
                             r"<\|start\|>user<\|message\|>(?P<user>.*?)<\|end\|><\|start\|>assistant", re.DOTALL)
LINE_CHARACTERS = "\n\r\t"  # the control characters a situation's text may hold


def why_unsafe_text(text):
    """Why `text` (a situation, written by a person or another tool) cannot go into a prompt, or None.

    A Harmony marker in it would be read as a real special token, so a prompt could forge the conversation (an
    assistant's final answer inside the user turn, say); a control character other than line breaks and tabs is
    no text a model was trained to read. Both are refused, never silently stripped.
    """
    marker = MARKER.search(text)
    if marker:
        return (f"holds {marker.group()!r}, which the tokenizer reads as a Harmony special token (the text could "
                "forge the conversation); remove it from the text")
    control = next((c for c in text if unicodedata.category(c) == "Cc" and c not in LINE_CHARACTERS), None)
    if control is not None:
        return f"holds the control character U+{ord(control):04X}; remove it from the text"
    return None


def why_not_rendered_prompt(text):
    """Why `text` is not a Harmony prompt as convert_to_harmony.py renders it, or None: the template's structure
    exactly (one system, one developer and one user message, ending at <|start|>assistant), and a user message
    that passes why_unsafe_text."""
    match = RENDERED_PROMPT.fullmatch(text)
    if match is None or any(MARKER.search(match[part]) for part in ("system", "developer")):
        return ("is not what the template renders (one system, one developer and one user message, ending at "
                "<|start|>assistant); render the situation again with convert_to_harmony.py")
    reason = why_unsafe_text(match["user"])
    return None if reason is None else f"has a user message that {reason}"


def is_harmony_prompt(text):
    """True when `text` already is a rendered Harmony prompt (so converting it again would nest it)."""
    return text.lstrip().startswith("<|start|>system<|message|>")


# The whole final message, stripped of surrounding whitespace: one action number in ASCII digits, without leading
# zeros, in square brackets, as the developer instructions ask ('[2]'; not '[ 2 ]', '[02]', '[２]' or '[2] x')
ANSWER = re.compile(r"\[(0|[1-9][0-9]*)\]")
MESSAGE = re.compile(
    r"<\|channel\|>(?P<channel>[^<]*)<\|message\|>(?P<content>.*?)(?P<end><\|end\|>|<\|return\|>|<\|call\|>|$)",
    re.DOTALL,
)


def split_messages(completion):
    """Harmony completion text (special tokens kept) -> [(channel, content, terminator)] in order.

    The terminator is '<|end|>', '<|return|>', '<|call|>' or '' when the text was cut off.
    """
    messages = []
    for part in completion.split("<|start|>"):
        part = part.removeprefix("assistant")
        match = MESSAGE.match(part)
        if match:
            messages.append((match["channel"].strip(), match["content"], match["end"]))
    return messages


def parse_final_action(completion, num_actions):
    """The action chosen in the final message of a Harmony completion, or None when the answer is invalid.

    Valid means: exactly one final message, it is the last message and ends with <|return|> (not cut off,
    not a tool call), and, stripped of surrounding whitespace, it is exactly `[n]` (ANSWER) for a listed action n.
    Text in the analysis channel never counts, whatever actions it mentions.
    """
    completion = completion.replace("<|endoftext|>", "")  # padding after the answer
    messages = split_messages(completion)
    finals = [m for m in messages if m[0].split()[:1] == ["final"]]
    if len(finals) != 1 or messages[-1] is not finals[0] or finals[0][2] != "<|return|>":
        return None
    answer = ANSWER.fullmatch(finals[0][1].strip())
    if answer is None or int(answer[1]) >= num_actions:
        return None
    return int(answer[1])
