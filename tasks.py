"""The tasks a run trains on, and the built-in demo world a method reader never needs to open.

- answer extraction (`last_boxed`, `answer_key`) and `UserError`, the one-line error every loader raises;
- the built-in countdown task (TinyZero): a seeded problem generator and an exact checker that never runs model text;
- the built-in arithmetic task: seeded one- and two-step word problems (Tom has 3 apples...) after one worked
  example, checked exactly on the final number;
- dataset presets (hub ids and fields), loading from the hub or local files, prompt formatting;
- the built-in `tiny` model: a Qwen2 of ~1M parameters with its own tokenizer, SFT-warmed on countdown, cached;
- the training and held-out sets of a run (prompts that fit the model) and the training order (`step_problems`).

The method scripts import all of this through common.py."""
import ast
import hashlib
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
from fractions import Fraction

import numpy as np
import torch

# datasets, huggingface_hub, tokenizers and transformers are imported inside the functions that use them: together
# they take seconds to import, and `python grpo.py --help` (or a mistyped flag) should not wait for them.


# ============================================================================ user errors and answer extraction
class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, unknown dataset field). Scripts print its message
    on one line and exit with status 2 instead of a traceback."""


def require(cond, message):
    if not cond:
        raise UserError(message)


def last_boxed(text, max_len=2000):
    r"""Content of the last \boxed{...} (or \fbox{...}) in `text`, braces balanced; None if there is none."""
    if not isinstance(text, str):
        return None
    for cmd in ("\\boxed", "\\fbox"):
        start = text.rfind(cmd + "{")
        if start >= 0:
            break
    else:
        start = text.rfind("\\boxed ")  # \boxed 5
        if start < 0:
            return None
        return text[start + 7:].split("$")[0].strip()[:max_len] or None
    i = start + len(cmd) + 1
    depth, j = 1, i
    while j < len(text) and j - i <= max_len:
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None


def answer_key(problem, completion):
    """Normalised answer string, to count distinct correct answers per problem (arithmetic: its final number, so
    every correct completion gives the same one)."""
    if problem.get("task") == "arithmetic":
        return final_number(completion)
    boxed = last_boxed(completion) or ""
    return re.sub(r"\s+", "", boxed)


# ============================================================================ built-in task: countdown
COUNTDOWN_INSTRUCTION = "Use each number once with + - * / to reach the target. Put the expression in \\boxed{}."


def countdown_prompt(numbers, target):
    """The question text of one countdown problem (no chat template)."""
    return f"Numbers: {' '.join(map(str, numbers))}. Target: {target}. {COUNTDOWN_INSTRUCTION}\n"


def _random_solution(rng, numbers):
    """Combine the numbers (in a random order) with random ops; keep every intermediate a positive integer.
    Returns (expression string, value) or None."""
    items = [(str(n), n) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (ea, a), (eb, b) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "-" and a <= b:
            (ea, a), (eb, b) = (eb, b), (ea, a)
            if a == b:
                return None
        if op == "/" and (b == 0 or a % b != 0 or b == 1):
            return None
        if op == "*" and (a == 1 or b == 1):
            return None
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        expr = f"({ea}{op}{eb})"
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [(expr, value)]
    expr, value = items[0]
    return expr[1:-1] if expr.startswith("(") else expr, value


def countdown_problems(n, seed, split="train", min_numbers=3, max_numbers=4, max_number=20, max_target=100):
    """`n` countdown problems: dicts {prompt, numbers, target, solution, task}. Deterministic in (seed, split);
    the held-out split ("test") never contains a (numbers, target) pair of the train split (a hash of the
    problem decides its split, so the two are disjoint whatever n is)."""
    rng = random.Random(f"countdown-{seed}-{split}")
    out, seen = [], set()
    while len(out) < n:
        k = rng.randint(min_numbers, max_numbers)
        numbers = [rng.randint(1, max_number) for _ in range(k)]
        sol = _random_solution(rng, numbers)
        if sol is None:
            continue
        expr, target = sol
        if not (1 <= target <= max_target):
            continue
        key = (tuple(sorted(numbers)), target)
        in_test = (hash_problem(key) % 10) == 0  # 10% of the problem space is held out
        if in_test != (split == "test") or key in seen:
            continue
        seen.add(key)
        out.append({"prompt": countdown_prompt(numbers, target), "numbers": numbers, "target": target,
                    "solution": expr, "gold": str(target), "task": "countdown"})
    return out


# ============================================================================ built-in task: arithmetic word problems
# One or two operations on small numbers, in a sentence a small chat model can read: for models that know some
# arithmetic but no countdown search (SmolLM2-135M-Instruct). Each template: (text, answer from a, b, c,
# the calculation written out for a worked example).
ARITHMETIC_TEMPLATES = [
    ("{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?",
     lambda a, b, c: a + b, "{a} + {b}"),
    ("{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
     lambda a, b, c: a - b, "{a} - {b}"),
    ("{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
     lambda a, b, c: a * b, "{a} * {b}"),
    ("{name} has {a} {item}, buys {b} more, then gives {c} away. How many {item} does {name} have now?",
     lambda a, b, c: a + b - c, "{a} + {b} - {c}"),
    ("{name} has {a} boxes with {b} {item} in each box and loses {c} {item}. How many {item} are left?",
     lambda a, b, c: a * b - c, "{a} * {b} - {c}"),
    ("{name} has {a} {item}. A friend gives {name} {b} more, and {name} buys {c} more. How many {item} now?",
     lambda a, b, c: a + b + c, "{a} + {b} + {c}"),
]
ARITHMETIC_NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma"]
ARITHMETIC_ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells"]


ARITHMETIC_PROMPT = ("Answer the question. Write the calculation, then the answer in \\boxed{{}}.\n\n"
                     "Example:\nQuestion: {example}\nAnswer: {work} \\boxed{{{gold}}}\n\nQuestion: {question}")


def arithmetic_problems(n, seed, split="train", max_number=12):
    """`n` word problems of one or two operations (+ - *) on numbers 1..max_number, with a non-negative integer answer:
    dicts {prompt, question, gold, work, task: "arithmetic"}. The prompt holds its instruction and one worked example
    (another training problem: a small chat model copies the format it is shown, and a fixed example number would be
    copied too); arithmetic_reward checks the final number exactly. Deterministic in (seed, split); train and test
    are disjoint (10% of the problem space is held out, as in countdown_problems)."""
    problems = arithmetic_questions(n, seed, split, max_number)
    examples = arithmetic_questions(n + 1, seed, "example", max_number)  # drawn from the training side of the split
    out = []
    for i, p in enumerate(problems):
        e = examples[i] if examples[i]["question"] != p["question"] else examples[i + 1]  # never its own answer
        out.append({**p, "prompt": ARITHMETIC_PROMPT.format(example=e["question"], work=e["work"], gold=e["gold"],
                                                            question=p["question"])})
    return out


def arithmetic_questions(n, seed, split, max_number):
    """`n` distinct bare questions {question, gold, work, task}: test keys for split "test", training keys otherwise
    (split "example" draws its own sequence of training keys, for the worked examples)."""
    rng = random.Random(f"arithmetic-{seed}-{split}")
    out, seen = [], set()
    while len(out) < n:
        t = rng.randrange(len(ARITHMETIC_TEMPLATES))
        text, answer, calculation = ARITHMETIC_TEMPLATES[t]
        a, b, c = (rng.randint(1, max_number) for _ in range(3))
        name, item = rng.choice(ARITHMETIC_NAMES), rng.choice(ARITHMETIC_ITEMS)
        key = (t, a, b, c if "{c}" in text else 0, name, item)
        in_test = (hash_problem(key) % 10) == 0
        if answer(a, b, c) < 0 or in_test != (split == "test") or key in seen:
            continue
        seen.add(key)
        gold = str(answer(a, b, c))
        out.append({"question": text.format(name=name, item=item, a=a, b=b, c=c), "gold": gold, "task": "arithmetic",
                    "work": f"{calculation.format(a=a, b=b, c=c)} = {gold}."})
    return out


GENERATED = {"countdown": countdown_problems, "arithmetic": arithmetic_problems}  # built-in tasks: name -> generator


def hash_problem(key):
    import hashlib
    return int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)


# ============================================================================ rewards (verifiers)
# ---------------------------------------------------------------- countdown

_CD_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_CD_SYMBOLS = {"×": "*", "÷": "/", "−": "-", "\\times": "*", "\\cdot": "*", "\\div": "/"}


def _cd_value(node):
    """Exact value of a parsed countdown expression; ValueError on anything but ints, + - * / and parentheses."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _CD_OPS:
        return _CD_OPS[type(node.op)](_cd_value(node.left), _cd_value(node.right))  # x/0 raises
    raise ValueError(f"not allowed in countdown: {type(node).__name__}")


def arithmetic_reward(completion, gold):
    r"""1.0 iff the final number of `completion` is `gold` (an integer string), else 0.0. The final number is the last
    integer inside the last \boxed{} when there is one (so "\boxed{10 cookies}" counts), else the last integer of
    the whole completion ("... so Emma has 10 cookies left."): a 135M model rarely boxes its answer, and the task
    is the arithmetic. Thousands separators are ignored; a sign is part of the number."""
    return float(final_number(completion) == str(gold))


def final_number(completion):
    r"""The last integer (as written, with its sign) inside the last \boxed{} of `completion` if there is one, else in
    the whole text; None if there is none. Thousands separators are dropped first."""
    if not isinstance(completion, str):
        return None
    boxed = last_boxed(completion)
    numbers = re.findall(r"-?\d+", (completion if boxed is None else boxed).replace(",", ""))
    return numbers[-1] if numbers else None


def countdown_reward(completion, numbers, target):
    r"""1.0 iff the last \boxed{} of `completion` is an expression using exactly `numbers` (each once, with
    + - * / and parentheses) whose exact value is `target`; 0.0 otherwise, whatever the input. Never evaluates
    model text: the expression is parsed with `ast` and computed with Fractions."""
    try:
        expr = last_boxed(completion)
        if expr is None or len(expr) > 200:
            return 0.0
        for symbol, op in _CD_SYMBOLS.items():
            expr = expr.replace(symbol, op)
        expr = expr.strip()
        if not re.fullmatch(r"[0-9+\-*/() \t]+", expr):  # no names, calls, dots, unicode digits, ...
            return 0.0
        used = re.findall(r"[0-9]+", expr)  # the multiset check bounds the tree size before parsing
        if len(used) > 20 or sorted(int(u) for u in used) != sorted(int(n) for n in numbers):
            return 0.0
        return 1.0 if _cd_value(ast.parse(expr, mode="eval").body) == Fraction(target) else 0.0
    except Exception:  # SyntaxError, ZeroDivisionError, ValueError, RecursionError, MemoryError, bad args
        return 0.0




# ============================================================================ datasets
# name -> where the data lives on the Hugging Face hub and how to read it. `gold` says how the reference answer
# is extracted from the `answer` field: "####" = text after #### (GSM8K), "boxed" = last \boxed{} of a worked
# solution, "field" = the field is the answer (a list means "any of these"). `name` may be a list of configs,
# loaded one after the other and concatenated. "eval" as a split means `eval_split` (default: `split`).
DATASET_PRESETS = {
    "gsm8k": dict(path="openai/gsm8k", name="main", split="train", eval_split="test",
                  prompt="question", answer="answer", gold="####"),
    "math-lighteval": dict(path="DigitalLearningGmbH/MATH-lighteval", name=None, split="train",
                           prompt="problem", answer="solution", gold="boxed"),
    "math500": dict(path="HuggingFaceH4/MATH-500", name=None, split="test",
                    prompt="problem", answer="answer", gold="field"),
    "aime24": dict(path="HuggingFaceH4/aime_2024", name=None, split="train",  # 30 problems
                   prompt="problem", answer="answer", gold="field"),
    "aime25": dict(path="opencompass/AIME2025", name=["AIME2025-I", "AIME2025-II"], split="test",
                   prompt="question", answer="answer", gold="field"),
    "amc23": dict(path="math-ai/amc23", name=None, split="test",  # 40 problems
                  prompt="question", answer="answer", gold="field"),
    "minerva": dict(path="math-ai/minervamath", name=None, split="test",  # 272 problems
                    prompt="question", answer="answer", gold="field"),
    "olympiad": dict(path="lkevinzc/math-eval", name=None, split="olympiad_bench",  # 675 problems, list answers
                     prompt="problem", answer="answer", gold="field"),
    # the raw hub copy of DAPO repeats every prompt ~100 times: keep the first occurrence of each prompt
    "dapo-math-17k": dict(path="open-r1/DAPO-Math-17k-Processed", name="en", split="train",
                          prompt="prompt", answer="solution", gold="field", dedup=True),
}
PROMPT_FIELDS, ANSWER_FIELDS = ("prompt", "problem", "question"), ("answer", "gold", "solution", "target")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test", "eval": "test",
               "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation"}
MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def _gold(value, how):
    """Reference answer(s) as str (or list of str: any matches) from a raw answer field; None if there is none.
    how: "####", "boxed", "field" (see DATASET_PRESETS) or "auto" (local files, hub ids): the last \\boxed{} if
    there is one, else the text after #### if there is one, else the whole field."""
    if isinstance(value, (list, tuple)):
        return [g for g in (_gold(v, how) for v in value) if g is not None] or None
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    value = str(value)  # numeric answers (AIME: 204) become "204"
    if how == "boxed" or (how == "auto" and ("\\boxed" in value or "\\fbox" in value)):
        return last_boxed(value)
    if how == "####" or (how == "auto" and "####" in value):
        return value.split("####")[-1].strip().replace(",", "") or None
    return value.strip() or None


def _text(prompt):
    """Question text; a chat-format prompt (list of {role, content}) gives its last user message."""
    if isinstance(prompt, list):
        user = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = user[-1] if user else None
    return prompt.strip() if isinstance(prompt, str) else None


def _pick_field(columns, explicit, defaults, kind, source):
    if explicit is None:
        explicit = next((f for f in defaults if f in columns), None)
    if explicit not in columns:
        wanted = f"'{explicit}'" if explicit else f"one of {', '.join(defaults)}"
        raise UserError(f"{source} has no {kind} field {wanted}; its fields are {', '.join(columns)}: "
                        f"pass --{kind}-field NAME")
    return explicit


def _split_of(file):
    """The split a data file's path names: test.jsonl, train-00000-of-00001.parquet, data/test/x.json -> "train",
    "test" or "validation" (see SPLIT_WORDS); None for a name with no split in it."""
    for word in re.split(r"[^a-z0-9]+", file.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _load_local(path, split, configs=(None,)):
    """A file loads whole, whatever the split. A folder (a copy of a hub dataset, e.g. what `hf download --repo-type
    dataset ID --local-dir DIR` writes) loads the files that name `split` (train-0000.parquet, test.jsonl; all of its
    files when none names a split), from its `configs` subfolders when it has them (gsm8k: DIR/main/)."""
    fmt = LOCAL_FORMATS.get(os.path.splitext(path)[1].lower())
    if not os.path.isdir(path) and not fmt:
        raise UserError(f"'{path}' is not a .jsonl/.json/.parquet file: convert it to one of these formats")
    split = split or "train"
    tables = []
    for folder in [os.path.join(path, c) for c in configs if c and os.path.isdir(os.path.join(path, c))] or [path]:
        files = [path] if fmt else sorted(os.path.join(d, f) for d, dirs, names in os.walk(folder) for f in names
                                          if not os.path.relpath(os.path.join(d, f), folder).startswith(".")
                                          and os.path.splitext(f)[1].lower() in LOCAL_FORMATS)  # not .cache/
        rel = [os.path.relpath(f, folder) for f in files]
        match = [f for f, r in zip(files, rel) if _split_of(r) == SPLIT_WORDS.get(split, split)
                 or os.path.basename(r).startswith(split)]  # or a preset's own split name: olympiad_bench.jsonl
        if not fmt and (match or any(_split_of(r) for r in rel)):  # else one split in files (aime2025-I, -II.jsonl)
            files = match
        if not files:
            raise UserError(f"'{folder}' has no .jsonl/.json/.parquet file for split {split} (it has: "
                            f"{', '.join(rel) or 'none'}): name the split in the file names or pass one file")
        formats = {LOCAL_FORMATS[os.path.splitext(f)[1].lower()] for f in files}
        if len(formats) > 1:
            raise UserError(f"'{folder}' mixes .parquet and .json/.jsonl files for split {split}: pass one file")
        for f in files:
            check_jsonl(f)
        from datasets import load_dataset
        try:
            tables.append(load_dataset(formats.pop(), data_files=files, split="train"))
        except Exception as e:  # datasets' own errors (DatasetGenerationError, ArrowInvalid, ...) name no line
            raise UserError(f"could not read '{folder}' (split {split}): {str(e).splitlines()[0]}: "
                            f"fix the file or pass one .jsonl/.json/.parquet file") from e
    return tables


def check_jsonl(path):
    """Stop with the file and line a user has to fix: an empty .jsonl file (datasets fails with a bare StopIteration)
    or a line that is not one JSON object (datasets names no line). One pass over the file, before datasets reads it."""
    if os.path.splitext(path)[1].lower() != ".jsonl":
        return
    rows = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"'{path}' line {i} is not valid JSON ({e.msg}, column {e.colno}): fix that line "
                                f"(one JSON object per line)") from None
            require(isinstance(row, dict), f"'{path}' line {i} is not a JSON object: each line must be one object "
                                           f"with a prompt and an answer field")
            rows += 1
    require(rows, f"'{path}' is empty: it needs one JSON object per line with a prompt and an answer field, like "
                  f"{{\"prompt\": \"What is 2+3?\", \"answer\": \"5\"}}")


def hub_reachable(timeout=5.0):
    """Can the Hugging Face hub be reached? False at once with HF_HUB_OFFLINE=1 or when its host does not answer in
    `timeout` seconds, so loading a hub id offline fails in seconds instead of after huggingface_hub's retries."""
    import socket
    import urllib.parse
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell: leave it to huggingface_hub
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _load_hub(path, names, split):
    import datasets.config
    import huggingface_hub.constants
    from datasets import load_dataset
    from huggingface_hub.errors import HfHubHTTPError
    if not hub_reachable():  # their offline mode (read from HF_HUB_OFFLINE at import): the local cache only, at once,
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True  # not 30 s of retries
    try:
        return [load_dataset(path, name, split=split) for name in names]
    except (ConnectionError, FileNotFoundError, HfHubHTTPError) as e:  # offline, no network, unknown id, gated
        raise UserError(f"could not load '{path}' from the Hugging Face hub (offline or unknown id): download it on "
                        f"a machine with internet (`hf download --repo-type dataset {path} --local-dir DIR`) and pass "
                        f"the local path (DIR or one of its .parquet/.jsonl files), or check the id") from e
    except ValueError as e:  # unknown config or split
        raise UserError(f"could not load '{path}' split '{split}': {str(e).splitlines()[0]}: check --split") from e


def dataset_name(spec):
    """(name, source) of one --dataset / --eval-datasets entry. "NAME=SOURCE" names it (NAME a preset: the preset's
    fields and gold extraction applied to SOURCE, a local copy of it); otherwise countdown and presets keep their
    name, a local file or folder gets its stem (/data/gsm8k/eval.jsonl -> eval) and a hub id its last part. Names
    go into metric keys (eval/<name>/pass@1), so they are letters, digits and _ . + - only."""
    spec = spec.strip()
    if "=" in spec and not os.path.exists(os.path.expanduser(spec)):
        name, source = (x.strip() for x in spec.split("=", 1))
        require(re.fullmatch(r"[\w.+-]+", name) and source,
                f"dataset '{spec}': NAME=SOURCE needs a NAME of letters, digits, _ . + - and a SOURCE")
        return name, source
    if spec in GENERATED or spec in DATASET_PRESETS:
        return spec, spec
    stem = os.path.basename(spec.rstrip("/\\"))
    stem = os.path.splitext(stem)[0] if os.path.splitext(stem)[1].lower() in LOCAL_FORMATS else stem
    return re.sub(r"[^\w.+-]+", "_", stem) or "data", spec


def dataset_names(s):
    """{name: spec} of a comma-separated --eval-datasets value; two entries with one name are an error."""
    out = {}
    for spec in parse_dataset_list(s):
        name = dataset_name(spec)[0]
        require(name not in out, f"two datasets are named '{name}' ({out.get(name)} and {spec}): "
                                 f"name them apart with NAME=PATH (e.g. {name}-2={dataset_name(spec)[1]})")
        out[name] = spec
    return out


def load_problems(spec, split=None, prompt_field=None, answer_field=None, n=None, seed=0, keep_answer=False):
    """Problems {prompt, gold, task} from `spec`: a built-in task ("countdown", "arithmetic": GENERATED), a
    DATASET_PRESETS name, a local .jsonl/.json/.parquet file (or folder of them), a hub id owner/name, or NAME=SOURCE
    (PRESET=PATH: the preset's fields and gold on a local copy). split "eval" is the held-out split: the preset's eval
    split, else test. `n` keeps the first n after a shuffle seeded by `seed` (a built-in task generates n, default 2000
    train / 200 test). keep_answer: each problem also holds its raw answer field as "answer" (eval.py golds)."""
    name, spec = dataset_name(spec)
    if spec in GENERATED:
        if split not in (None, "train", "test", "eval", "validation"):
            raise UserError(f"{spec} has no split '{split}': use train or test")
        split = "train" if split in (None, "train") else "test"
        return GENERATED[spec](n or (2000 if split == "train" else 200), seed, split=split)
    how, dedup, configs, path = "auto", False, [None], os.path.expanduser(spec)
    preset = DATASET_PRESETS.get(spec) or DATASET_PRESETS.get(name)  # the hub preset, or PRESET=SOURCE
    if preset:
        split = preset.get("eval_split", preset["split"]) if split == "eval" else split or preset["split"]
        configs = preset["name"] if isinstance(preset["name"], list) else [preset["name"]]
        prompt_field, answer_field = prompt_field or preset["prompt"], answer_field or preset["answer"]
        how, dedup = preset["gold"], preset.get("dedup", False)
    split = "test" if split == "eval" else split
    if spec in DATASET_PRESETS:
        tables = _load_hub(preset["path"], configs, split)
    elif os.path.exists(path):
        tables = _load_local(path, split, configs)
    elif os.path.splitext(spec)[1].lower() in LOCAL_FORMATS or spec.startswith((".", "/", "~")):
        raise UserError(f"dataset file '{spec}' does not exist: check the path")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        tables = _load_hub(spec, configs, split or "train")
    else:
        raise UserError(f"unknown dataset '{spec}': use countdown, arithmetic, one of {', '.join(DATASET_PRESETS)}, "
                        f"a hub id like owner/name, or a local .jsonl/.json/.parquet file")
    problems, seen, dropped = [], set(), 0
    for ds in tables:
        pf = _pick_field(ds.column_names, prompt_field, PROMPT_FIELDS, "prompt", f"dataset '{spec}'")
        af = _pick_field(ds.column_names, answer_field, ANSWER_FIELDS, "answer", f"dataset '{spec}'")
        for prompt, answer in zip(ds[pf], ds[af]):
            prompt, gold = _text(prompt), _gold(answer, how)
            if not prompt or gold is None:
                dropped += 1
            elif not (dedup and prompt in seen):
                seen.add(prompt)
                problems.append({"prompt": prompt, "gold": gold, "task": "math"})
                problems[-1].update({"answer": answer} if keep_answer else {})
    if dropped:
        print(f"warning: dropped {dropped} rows of '{spec}' with an empty {pf} or no answer in {af}")
    if not problems:
        raise UserError(f"dataset '{spec}' (split {split or 'train'}) has no usable rows: "
                        f"check the split and the fields")
    if n is not None:
        random.Random(seed).shuffle(problems)
        problems = problems[:n]
    return problems


def format_prompt(tokenizer, problem):
    """The text given to the model: the prompt (+ the \\boxed{} instruction for math), in the chat template
    when the tokenizer has one."""
    built_in = problem.get("task") in ("countdown", "arithmetic")  # its prompt already holds its instruction
    text = problem["prompt"] + ("" if built_in else MATH_INSTRUCTION)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text if built_in else text + "\n"


def parse_dataset_list(s):
    """A comma-separated --eval-datasets value as a list: "math500, aime24" -> ["math500", "aime24"]."""
    return [x.strip() for x in (s or "").split(",") if x.strip()]


# ============================================================================ built-in model: tiny
# Qwen2's pre-tokenizer split: words, single digits (\p{N}), punctuation runs, newlines, spaces.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VERSION = "tiny-v2"  # bump when the build code changes: it is part of the cache key
TINY_CONFIGS = {
    # the built-in model `python grpo.py` starts from: 0.88M parameters, ~100 s to build on 2 CPU cores; after SFT
    # it solves ~10% of held-out countdown problems sampling at temperature 1 (~12-18% greedy): room for RL
    "default": dict(tokenizer_vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=384, max_position_embeddings=512,
                    tie_word_embeddings=False, sft_steps=1200, sft_batch=32, sft_lr=2e-3, seed=0),
    # 39K parameters, a few seconds to build: for tests
    "test": dict(tokenizer_vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                 tie_word_embeddings=False, sft_steps=30, sft_batch=16, sft_lr=3e-3, seed=0),
}
# tokenizer_vocab_size is an upper bound: BPE stops when no merge is left (single digits; ~346 tokens on countdown).
# The model's vocab_size is len(tokenizer).


def train_tiny_tokenizer(texts, vocab_size):
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on `texts`; <|endoftext|> is eos and pad, left padding.
    The 256-byte initial alphabet makes every string encodable, so decode(encode(s)) == s."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


def tiny_sft_examples(tokenizer, problems):
    """(prompt ids, completion ids) per problem; the completion is "\\boxed{solution}" + EOS."""
    prompts = tokenizer([p["prompt"] for p in problems])["input_ids"]
    completions = tokenizer(["\\boxed{" + p["solution"] + "}" for p in problems])["input_ids"]
    return [(p, c + [tokenizer.eos_token_id]) for p, c in zip(prompts, completions)]


def tiny_sft_batch(examples, pad_id):
    """Right-padded batch: input_ids, attention_mask [B, T] and labels [B, T] (-100 except on completion tokens)."""
    T = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), T), pad_id)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100)
    for i, (p, c) in enumerate(examples):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, :len(p) + len(c)] = 1
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@torch.no_grad()
def tiny_completion_loss(model, tokenizer, problems, batch=64):
    """Mean per-token cross-entropy of the model on the "\\boxed{solution}"+EOS completions of `problems`."""
    examples, total, count = tiny_sft_examples(tokenizer, problems), 0.0, 0
    for i in range(0, len(examples), batch):
        b = tiny_sft_batch(examples[i:i + batch], tokenizer.pad_token_id)
        n = int((b["labels"][:, 1:] != -100).sum())
        total, count = total + model(**b).loss.item() * n, count + n
    return total / count


def tiny_config(size, vocab_size, **tokens):
    """The Qwen2Config of the built-in model of this size (the memory plan reads it before the model is built)."""
    from transformers import Qwen2Config
    not_arch = ("tokenizer_vocab_size", "sft_steps", "sft_batch", "sft_lr", "seed")
    return Qwen2Config(**{k: v for k, v in TINY_CONFIGS[size].items() if k not in not_arch}, vocab_size=vocab_size,
                       **tokens)


def build_tiny_model(out_dir, size="default", log=print, reward_fn=None):
    """Train the tokenizer, SFT a fresh Qwen2 on countdown and save both into `out_dir` (atomically). Returns out_dir.
    If reward_fn(completion, problem) -> float is given, held-out sampled success is measured into tiny_build.json."""
    from tqdm.auto import tqdm
    from transformers import Qwen2ForCausalLM
    cfg = TINY_CONFIGS[size]
    seed, steps, bsz = cfg["seed"], cfg["sft_steps"], cfg["sft_batch"]
    random.seed(seed)
    torch.manual_seed(seed)
    problems = countdown_problems(steps * bsz, seed=seed, split="train")
    tokenizer = train_tiny_tokenizer([p["prompt"] + "\\boxed{" + p["solution"] + "}" for p in problems[:4000]],
                                     cfg["tokenizer_vocab_size"])
    config = tiny_config(size, len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    log(f"tiny-{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} SFT steps")
    examples = tiny_sft_examples(tokenizer, problems)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    warmup = max(1, steps // 20)  # linear warmup, then cosine decay to 10% of the peak lr

    def lr_factor(s):
        progress = min(1.0, max(0, s - warmup) / max(1, steps - warmup))
        return min((s + 1) / warmup, 0.55 + 0.45 * math.cos(math.pi * progress))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=f"SFT tiny-{size}", leave=False)):
        loss = model(**tiny_sft_batch(examples[step * bsz:(step + 1) * bsz], tokenizer.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    heldout = countdown_problems(200, seed=0, split="test")
    info = dict(size=size, config=cfg, version=TINY_VERSION, parameters=sum(p.numel() for p in model.parameters()),
                sft_first_losses=losses[:5], sft_final_loss=sum(losses[-20:]) / len(losses[-20:]),
                heldout_completion_loss=tiny_completion_loss(model, tokenizer, heldout))
    if reward_fn is not None:
        info["heldout_sampled_success"] = tiny_sampled_success(model, tokenizer, heldout, reward_fn)
    log(f"tiny-{size}: " + ", ".join(f"{k}={v:.3f}" for k, v in info.items() if isinstance(v, float)))
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "tiny_build.json"), "w") as f:
        json.dump(info, f, indent=1)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process built it meanwhile: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out_dir):
            raise
    return out_dir


@torch.no_grad()
def tiny_sampled_success(model, tokenizer, problems, reward_fn, batch=100, seed=0):
    """Mean reward_fn(completion, problem) over one temperature-1 sample per problem (32 new tokens at most)."""
    torch.manual_seed(seed)
    rewards = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        enc = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True)  # left-padded [B, T]
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                             temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=32)  # not **enc: some tokenizers add token_type_ids
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        rewards += [float(reward_fn(t, p)) for t, p in zip(texts, chunk)]
    return sum(rewards) / len(rewards)


def tiny_model_dir(size="default", reward_fn=None, build=True):
    """Path of the cached built-in model of this size (built on first use): $EXPLORE_RLVR_CACHE,
    else $XDG_CACHE_HOME/explore-rlvr, else ~/.cache/explore-rlvr, then tiny-<size>-<hash of config, code version and
    transformers' major version (4.x cannot read the tokenizer files 5.x writes)>. reward_fn (see build_tiny_model)
    only matters when it builds. build=False: the path only, built or not."""
    root = os.environ.get("EXPLORE_RLVR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "explore-rlvr")
    major = importlib.metadata.version("transformers").split(".")[0]  # without importing it (seconds)
    key = hashlib.sha256((json.dumps(TINY_CONFIGS[size],
                                     sort_keys=True) + TINY_VERSION + major).encode()).hexdigest()[:12]
    path = os.path.join(root, f"tiny-{size}-{key}")
    if build and not os.path.isdir(path):
        os.makedirs(root, exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the same weights whatever the number of cores (reduction order)
        try:
            build_tiny_model(path, size, reward_fn=reward_fn)
        finally:
            torch.set_num_threads(threads)
    return path


# ============================================================================ training and held-out sets
def step_problems(problems, step, n, seed):
    """The n training problems of a step: consecutive slices of a seeded permutation, reshuffled every epoch.
    A pure function of (step, seed), so a resumed run sees exactly the same prompts."""
    per_epoch = max(1, len(problems) // n)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(problems))
    return [problems[j] for j in order[i * n:(i + 1) * n]]


def fit_prompts(problems, tokenizer, model, args, name):
    """Drop problems whose prompt exceeds --max-prompt-tokens (and say how many); fail if prompt + completion cannot fit
    the model's context."""
    lengths = [len(x) for x in tokenizer([format_prompt(tokenizer, p) for p in problems],
                                         add_special_tokens=False).input_ids]
    keep = [p for p, n in zip(problems, lengths) if n <= args.max_prompt_tokens]
    if len(keep) < len(problems):
        print(f"{name}: dropped {len(problems) - len(keep)} of {len(problems)} problems longer than "
              f"--max-prompt-tokens {args.max_prompt_tokens}")
    require(keep, f"{name}: every prompt is longer than --max-prompt-tokens {args.max_prompt_tokens}: raise it")
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(n for n in lengths if n <= args.max_prompt_tokens)
    require(context is None or longest + args.max_new_tokens <= context,
            f"{name}: a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the model's "
            f"context of {context} tokens: lower --max-new-tokens or --max-prompt-tokens")
    return keep


def load_train_set(args, tokenizer, model):
    problems = load_problems(args.dataset, split="train", prompt_field=args.prompt_field,
                             answer_field=args.answer_field,
                             n=args.train_size if args.dataset in GENERATED else None, seed=args.seed)
    return fit_prompts(problems, tokenizer, model, args, dataset_name(args.dataset)[0])


def load_eval_sets(args, tokenizer, model):
    """{name: held-out problems} for --eval-datasets (the first --eval-problems of each, in a seeded order)."""
    return {name: fit_prompts(load_problems(spec, split="eval", prompt_field=args.prompt_field,
                                            answer_field=args.answer_field,
                                            n=args.eval_problems or None, seed=args.seed), tokenizer, model, args, name)
            for name, spec in dataset_names(args.eval_datasets).items()}
