import sys, os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json
import re
import datasets

import pytest
from common import (DATASET_PRESETS, UserError, dataset_name, dataset_names, format_prompt, load_problems,
                    parse_dataset_list)



def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- countdown ------------------------------------------------------------------------------------------------

def test_countdown_train_test_disjoint_and_deterministic():
    train = load_problems("countdown", n=300, seed=1)
    test = load_problems("countdown", split="eval", n=100, seed=1)
    assert len(train) == 300 and len(test) == 100
    key = lambda p: (tuple(sorted(p["numbers"])), p["target"])
    assert not {key(p) for p in train} & {key(p) for p in test}
    assert train == load_problems("countdown", split="train", n=300, seed=1)
    assert test == load_problems("countdown", split="test", n=100, seed=1)
    assert all(p["task"] == "countdown" and p["gold"] == str(p["target"]) for p in train)
    assert len(load_problems("countdown", split="validation")) == 200
    with pytest.raises(UserError, match="train or test"):
        load_problems("countdown", split="dev")


# ---- arithmetic word problems ---------------------------------------------------------------------------------

def test_arithmetic_train_test_disjoint_and_deterministic():
    train = load_problems("arithmetic", n=300, seed=1)
    test = load_problems("arithmetic", split="eval", n=100, seed=1)
    assert len(train) == 300 and len(test) == 100
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len({p["question"] for p in train}) == 300  # no repeats
    assert train == load_problems("arithmetic", split="train", n=300, seed=1)
    assert train != load_problems("arithmetic", split="train", n=300, seed=2)
    assert all(p["task"] == "arithmetic" and p["gold"].isdigit() for p in train)  # non-negative integers
    assert len(load_problems("arithmetic", split="validation")) == 200
    with pytest.raises(UserError, match="train or test"):
        load_problems("arithmetic", split="dev")


def test_arithmetic_templates_compute_their_answer():
    """Each template's answer, checked by hand on a = 5, b = 3, c = 2."""
    from tasks import ARITHMETIC_TEMPLATES
    assert [answer(5, 3, 2) for _, answer, _ in ARITHMETIC_TEMPLATES] == [8, 2, 15, 6, 13, 10]
    assert [calc.format(a=5, b=3, c=2) for _, _, calc in ARITHMETIC_TEMPLATES] == [
        "5 + 3", "5 - 3", "5 * 3", "5 + 3 - 2", "5 * 3 - 2", "5 + 3 + 2"]
    p = load_problems("arithmetic", split="eval", n=1, seed=0)[0]
    assert p["question"].startswith("Emma has 11 cookies and gives 1 of them") and p["gold"] == "10"
    assert p["work"] == "11 - 1 = 10."


def test_arithmetic_prompt_shows_a_worked_training_example():
    """The prompt is the instruction, a worked example (another problem, from the training side of the split, with its
    calculation and boxed answer) and the question, last."""
    from tasks import ARITHMETIC_PROMPT, arithmetic_questions, format_prompt
    test = load_problems("arithmetic", split="eval", n=200, seed=0)
    # ~15% of all held-out questions: an example drawn from the held-out side would be found here ~30 times in 200
    held_out = {p["question"] for p in arithmetic_questions(5000, 0, "test", 12)}
    for p in test:
        head, example, question = p["prompt"].split("\n\n")
        assert head == "Answer the question. Write the calculation, then the answer in \\boxed{}."
        assert question == "Question: " + p["question"]
        q, work = example.split("\n")[1:]
        assert q.startswith("Question: ") and q.removeprefix("Question: ") not in held_out
        assert q.removeprefix("Question: ") != p["question"]
        calculation, result, gold = re.fullmatch(r"Answer: (.*) = (\d+)\. \\boxed\{(\d+)\}", work).groups()
        assert eval(calculation) == int(result) == int(gold)  # the example's own answer is right (digits, + - *)
    assert format_prompt(None, test[0]) == test[0]["prompt"]  # no math instruction appended: it has its own
    assert ARITHMETIC_PROMPT.count("{question}") == 1


# ---- local files ----------------------------------------------------------------------------------------------

ROWS = [{"q": "What is 1+1?", "a": 2, "other": "x"}, {"q": "What is 2+3?", "a": 5, "other": "y"}]


def test_local_jsonl_json_parquet_with_explicit_fields(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    for path in (jsonl, str(tmp_path / "d.json"), str(tmp_path / "d.parquet")):
        problems = load_problems(path, prompt_field="q", answer_field="a")
        assert problems == [{"prompt": "What is 1+1?", "gold": "2", "task": "math"},
                            {"prompt": "What is 2+3?", "gold": "5", "task": "math"}], path


def test_local_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "a.jsonl", [{"problem": "p1", "answer": "1"}])
    write_jsonl(tmp_path / "plain" / "b.jsonl", [{"problem": "p2", "answer": "2"}])
    assert sorted(p["prompt"] for p in load_problems(str(tmp_path / "plain"))) == ["p1", "p2"]
    # a `hf download` of a dataset: split names in the file names pick the split
    (tmp_path / "hub" / "main").mkdir(parents=True)
    for split in ("train", "test"):
        datasets.Dataset.from_list([{"question": f"{split} q", "answer": "so\n#### 1,000"}]).to_parquet(
            str(tmp_path / "hub" / "main" / f"{split}-00000-of-00001.parquet"))
    assert load_problems(str(tmp_path / "hub")) == [{"prompt": "train q", "gold": "1000", "task": "math"}]
    assert load_problems(str(tmp_path / "hub"), split="test")[0]["prompt"] == "test q"
    with pytest.raises(UserError, match="split dev"):
        load_problems(str(tmp_path / "hub"), split="dev")


def test_default_field_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "7", "problem": "P?"}])
    assert load_problems(path) == [{"prompt": "P?", "gold": "7", "task": "math"}]  # problem before question
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "Q?", "solution": "so \\boxed{\\frac{1}{2}}."},
                                                {"question": "R?", "solution": "42"}])
    assert [p["gold"] for p in load_problems(path)] == ["\\frac{1}{2}", "42"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "T?", "target": 24}])
    assert load_problems(path)[0]["gold"] == "24"
    path = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "L?", "gold": ["1", "1.0"]}])
    assert load_problems(path)[0]["gold"] == ["1", "1.0"]


def test_missing_field_error_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError) as e:
        load_problems(path)  # no prompt/problem/question field
    msg = str(e.value)
    assert "prompt" in msg and "q, a, other" in msg and "--prompt-field" in msg
    with pytest.raises(UserError) as e:
        load_problems(path, prompt_field="q", answer_field="nope")
    assert "'nope'" in str(e.value) and "q, a, other" in str(e.value) and "--answer-field" in str(e.value)


def test_path_and_name_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_problems("./no/such/dir")
    with pytest.raises(UserError, match="unknown dataset 'foo': use countdown, arithmetic, one of gsm8k"):
        load_problems("foo")
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a .jsonl/.json/.parquet file"):
        load_problems(str(tmp_path / "d.csv"))


def test_empty_prompts_dropped_with_warning_and_empty_dataset(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "answer": "1"}, {"prompt": None, "answer": "2"},
                                               {"prompt": "ok", "answer": "3"}])
    assert [p["gold"] for p in load_problems(path)] == ["3"]
    out = capsys.readouterr().out
    assert out.count("dropped 2 rows") == 1
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "", "answer": "1"}])
    with pytest.raises(UserError, match="no usable rows"):
        load_problems(path)


def test_n_takes_seeded_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(50)])
    a, b = load_problems(path, n=10, seed=3), load_problems(path, n=10, seed=3)
    assert a == b and len(a) == 10 and a != load_problems(path, n=10, seed=4)
    assert [p["prompt"] for p in a] != [f"p{i}" for i in range(10)]


# ---- presets (hub mocked) -------------------------------------------------------------------------------------

def fake_hub(monkeypatch, tables):
    """Replace datasets.load_dataset (tasks.py imports it where it loads): tables maps (path, name, split) -> rows.
    Returns the calls made."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(tables[(path, name, split)])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_presets_table():
    assert set(DATASET_PRESETS) == {"gsm8k", "math-lighteval", "math500", "aime24", "aime25", "amc23", "minerva",
                                    "olympiad", "dapo-math-17k"}
    for p in DATASET_PRESETS.values():
        assert {"path", "name", "split", "prompt", "answer", "gold"} <= set(p)


def test_gsm8k_gold_after_hashes(monkeypatch):
    rows = [{"question": "How many?", "answer": "work <<2*3=6>>\n#### 1,234"}]
    calls = fake_hub(monkeypatch, {("openai/gsm8k", "main", "train"): rows, ("openai/gsm8k", "main", "test"): rows})
    assert load_problems("gsm8k") == [{"prompt": "How many?", "gold": "1234", "task": "math"}]
    load_problems("gsm8k", split="eval")
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_math_lighteval_last_boxed(monkeypatch):
    rows = [{"problem": "Half?", "solution": "First \\boxed{3}, no: $\\boxed{\\frac{1}{2}}$.", "level": "1"},
            {"problem": "None?", "solution": "no box here"}]
    fake_hub(monkeypatch, {("DigitalLearningGmbH/MATH-lighteval", None, "train"): rows})
    assert [p["gold"] for p in load_problems("math-lighteval")] == ["\\frac{1}{2}"]  # unboxed row dropped


def test_dapo_dedup(monkeypatch):
    rows = [{"prompt": f"problem {i % 3}", "solution": str(i % 3)} for i in range(30)]
    fake_hub(monkeypatch, {("open-r1/DAPO-Math-17k-Processed", "en", "train"): rows})
    problems = load_problems("dapo-math-17k")
    assert [(p["prompt"], p["gold"]) for p in problems] == [("problem 0", "0"), ("problem 1", "1"), ("problem 2", "2")]


def test_olympiad_list_gold_and_numeric_gold(monkeypatch):
    fake_hub(monkeypatch, {("lkevinzc/math-eval", None, "olympiad_bench"): [{"problem": "P", "answer": ["3", "x=3"]}],
                           ("HuggingFaceH4/aime_2024", None, "train"): [{"problem": "A", "answer": 204}]})
    assert load_problems("olympiad")[0]["gold"] == ["3", "x=3"]
    assert load_problems("aime24")[0]["gold"] == "204"


def test_aime25_concatenates_both_configs(monkeypatch):
    calls = fake_hub(monkeypatch, {
        ("opencompass/AIME2025", "AIME2025-I", "test"): [{"question": "I1", "answer": "1"},
                                                          {"question": "I2", "answer": "2"}],
        ("opencompass/AIME2025", "AIME2025-II", "test"): [{"question": "II1", "answer": "3"}]})
    assert [p["prompt"] for p in load_problems("aime25")] == ["I1", "I2", "II1"]
    assert calls == [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")]


def test_preset_field_override_and_hub_id(monkeypatch):
    calls = fake_hub(monkeypatch, {("HuggingFaceH4/MATH-500", None, "test"): [{"problem": "P", "answer": "1",
                                                                                "alt": "2"}],
                                   ("someone/data", None, "train"): [{"question": "Q", "solution": "\\boxed{9}"}]})
    assert load_problems("math500", answer_field="alt")[0]["gold"] == "2"
    assert load_problems("someone/data") == [{"prompt": "Q", "gold": "9", "task": "math"}]
    assert calls[-1] == ("someone/data", None, "train")


def test_offline_hub_id_is_user_error_and_fast(monkeypatch):
    # HF_HUB_OFFLINE is read when huggingface_hub/datasets are imported, so set the module constants too
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:  # offline mode: no retries (no wall-clock bound: load would fail it)
        load_problems("nobody-xyz/no-such-dataset-123")
    msg = str(e.value)
    assert "could not load 'nobody-xyz/no-such-dataset-123'" in msg and "download" in msg and "local path" in msg
    assert isinstance(e.value.__cause__, ConnectionError)
    with pytest.raises(UserError, match="hf download --repo-type dataset openai/gsm8k"):
        load_problems("gsm8k")


# ---- prompts --------------------------------------------------------------------------------------------------

def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["what is one plus one"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_format_prompt_without_chat_template():
    tok = tiny_tokenizer()
    assert not getattr(tok, "chat_template", None)
    math = {"prompt": "What is 1+1?", "gold": "2", "task": "math"}
    assert format_prompt(tok, math) == ("What is 1+1?\nPlease reason step by step, and put your final answer "
                                        "within \\boxed{}.\n")
    cd = load_problems("countdown", n=1)[0]
    assert format_prompt(tok, cd) == cd["prompt"]
    assert format_prompt(None, cd) == cd["prompt"]


def test_format_prompt_with_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    math = {"prompt": "What is 1+1?", "gold": "2", "task": "math"}
    assert format_prompt(tok, math) == ("<|user|>What is 1+1?\nPlease reason step by step, and put your final "
                                        "answer within \\boxed{}.<|end|><|assistant|>")
    cd = load_problems("countdown", n=1)[0]
    assert format_prompt(tok, cd) == f"<|user|>{cd['prompt']}<|end|><|assistant|>"


def test_parse_dataset_list():
    assert parse_dataset_list("math500, aime24,,  amc23 ") == ["math500", "aime24", "amc23"]
    assert parse_dataset_list("") == []


# ---- dataset names and presets on local copies --------------------------------------------------------------

def test_dataset_names():
    assert dataset_name("/data/gsm8k/eval.jsonl") == ("eval", "/data/gsm8k/eval.jsonl")
    assert dataset_name("../shared/data/gsm8k/") == ("gsm8k", "../shared/data/gsm8k/")
    assert dataset_name("gsm8k=../shared/data/gsm8k") == ("gsm8k", "../shared/data/gsm8k")
    assert dataset_name("mine = /d/x y.parquet") == ("mine", "/d/x y.parquet")
    assert dataset_name("/d/x y.parquet") == ("x_y", "/d/x y.parquet")  # names go into metric keys: no spaces, no /
    assert dataset_name("someone/data") == ("data", "someone/data")
    assert dataset_name("math500") == ("math500", "math500") and dataset_name("countdown")[0] == "countdown"
    assert dataset_names("countdown, a=/x/t.jsonl, /y/t.jsonl") == {"countdown": "countdown", "a": "a=/x/t.jsonl",
                                                                    "t": "/y/t.jsonl"}
    with pytest.raises(UserError, match=r"two datasets are named 't' .*NAME=PATH \(e.g. t-2=/y/t.jsonl\)"):
        dataset_names("/x/t.jsonl,/y/t.jsonl")
    with pytest.raises(UserError, match="NAME=SOURCE needs a NAME"):
        dataset_name("a/b=/x.jsonl")


PRESET_ANSWERS = {"####": ("work <<2*3=6>>\n#### 1,234", "1234"),
                  "boxed": ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
                  "field": (204, "204")}


@pytest.mark.parametrize("preset", sorted(DATASET_PRESETS))
def test_preset_on_a_local_file_reads_as_the_hub_version(monkeypatch, tmp_path, preset):
    p = DATASET_PRESETS[preset]
    answer, gold = PRESET_ANSWERS[p["gold"]]
    decoys = {"prompt": "not the prompt", "problem": "not the prompt", "question": "no", "answer": "9", "solution": "9"}
    rows = [{**decoys, p["prompt"]: f"{preset} question {i}", p["answer"]: answer} for i in (0, 1, 0)]  # auto: decoys
    names = p["name"] if isinstance(p["name"], list) else [p["name"]]
    fake_hub(monkeypatch, {(p["path"], name, p["split"]): rows for name in names})
    hub = load_problems(preset)
    monkeypatch.undo()  # the real load_dataset for the local copy
    assert hub[0] == {"prompt": f"{preset} question 0", "gold": gold, "task": "math"}
    ext = [".jsonl", ".json", ".parquet"][sorted(DATASET_PRESETS).index(preset) % 3]  # every format, over the presets
    path = str(tmp_path / f"copy{ext}")
    if ext == ".parquet":
        datasets.Dataset.from_list(rows * len(names)).to_parquet(path)
    else:
        (tmp_path / f"copy{ext}").write_text(json.dumps(rows * len(names)) if ext == ".json" else
                                             "".join(json.dumps(r) + "\n" for r in rows * len(names)))
    assert load_problems(f"{preset}={path}") == hub
    assert load_problems(f"{preset}={path}", split="eval") == hub  # one file: one split


def gsm8k_hub_download(root):
    """What `hf download --repo-type dataset openai/gsm8k --local-dir root` writes: README.md (with the configs),
    main/ and socratic/ parquet files, .cache/huggingface/."""
    (root / ".cache" / "huggingface" / "download" / "main").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download" / "main" / "train-00000-of-00001.parquet.metadata").write_text("x")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: "
                                    "main/train-*\n- config_name: socratic\n  data_files:\n  - split: train\n"
                                    "    path: socratic/train-*\n---\n# GSM8K\n")
    for config in ("main", "socratic"):
        (root / config).mkdir()
        for split, n in (("train", 3), ("test", 2)):
            rows = [{"question": f"{config} {split} {i}", "answer": f"steps\n#### {i},000"} for i in range(n)]
            datasets.Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    return str(root)


def test_gsm8k_preset_on_a_hub_download_and_on_split_files(tmp_path):
    root = gsm8k_hub_download(tmp_path / "gsm8k")
    train, test = load_problems(f"gsm8k={root}"), load_problems(f"gsm8k={root}", split="eval")
    assert train == [{"prompt": f"main train {i}", "gold": f"{i}000", "task": "math"} for i in range(3)]
    assert [p["prompt"] for p in test] == ["main test 0", "main test 1"]  # the main config only, its test split
    # the shared copy's layout: train.jsonl and test.jsonl (+ a README.md)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "README.md").write_text("# GSM8K\n")
    write_jsonl(tmp_path / "flat" / "train.jsonl", [{"question": "q1", "answer": "a\n#### 18"}])
    write_jsonl(tmp_path / "flat" / "test.jsonl", [{"question": "q2", "answer": "b\n#### -3"}])
    assert load_problems(f"gsm8k={tmp_path / 'flat'}") == [{"prompt": "q1", "gold": "18", "task": "math"}]
    assert load_problems(f"gsm8k={tmp_path / 'flat'}", split="eval") == [{"prompt": "q2", "gold": "-3", "task": "math"}]
    assert load_problems(f"mine={tmp_path / 'flat' / 'test.jsonl'}")[0]["gold"] == "-3"  # NAME=PATH: auto gold
    with pytest.raises(UserError, match="does not exist"):
        load_problems(f"gsm8k={tmp_path / 'nowhere'}")


def test_preset_split_names_and_one_split_folders(tmp_path):
    # lkevinzc/math-eval: one file per benchmark; the olympiad preset's split is olympiad_bench
    (tmp_path / "me").mkdir()
    for name in ("aime", "olympiad_bench", "math"):
        write_jsonl(tmp_path / "me" / f"{name}.jsonl", [{"problem": name, "answer": ["1"]}])
    assert load_problems(f"olympiad={tmp_path / 'me'}", split="eval") == [{"prompt": "olympiad_bench", "gold": ["1"],
                                                                           "task": "math"}]
    # a folder whose files name no split is one split (AIME2025-I and -II files)
    (tmp_path / "aime").mkdir()
    for part in ("I", "II"):
        write_jsonl(tmp_path / "aime" / f"aime2025-{part}.jsonl", [{"question": part, "answer": "7"}])
    assert [p["prompt"] for p in load_problems(f"aime25={tmp_path / 'aime'}", split="eval")] == ["I", "II"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jsonl/.json/.parquet file for split test"):
        load_problems(str(tmp_path / "empty"), split="eval")
