"""Facts to edit (the prompt sets other than facts are in `chatedit.prompts`).

Every editing format maps into one fact record (`FACT_FEATURES`):
    id, prompt, target, ground_truth, subject, rephrases[], loc_prompts[], loc_answers[],
    loc_kind
where `loc_kind` says what the locality prompts are (`LOC_KINDS`): "subject" (the same
subject in another relation: KnowEdit's Relation_Specificity), "neighbour" (another subject
in the same relation, whose true answer is the fact's old one: CounterFact's neighbourhood
prompts), "nq" (unrelated questions: zsRE's NQ questions in the MEND format) or "" (unknown).
Loaders return `datasets.Dataset`s. Datasets are selected by name (`FACT_DATASETS`), or
given as a JSON/JSONL file or a hub dataset id in any known format.

Splits (fixed and seeded; see assets/README.md):
- "test": the dataset's test file, never used in training;
- "train" / "validation": the training file, minus every fact whose subject or prompt
  occurs in the test file, split by groups of facts that share a subject or a prompt (so no
  fact and no subject is in two splits); a seeded shuffle of the groups fills validation
  with `val_size` facts (or a little more), the rest is train.
zsRE's NQ questions are split too (`nq_probes`): a seeded 2 x `NQ_PROBES` of them are held
out of training (their facts lose their locality prompt in train and validation), half the
validation split's LS_NQ probes, half the test split's.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets

from .text import check_text, key

ASSETS = Path(__file__).parent / "assets"

FACT_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "target": datasets.Value("string"),
    "ground_truth": datasets.Value("string"),
    "subject": datasets.Value("string"),
    "rephrases": datasets.List(datasets.Value("string")),
    "loc_prompts": datasets.List(datasets.Value("string")),
    "loc_answers": datasets.List(datasets.Value("string")),
    "loc_kind": datasets.Value("string"),
})
LOC_KINDS = ("subject", "neighbour", "nq", "")
NQ_PROBES = 150  # held-out NQ questions per split (validation, test)

# name -> {"train": file for train/validation, "test": test file} under assets/
FACT_DATASETS = {
    "zsre": {"train": "zsre/zsre_mend_train-1k.json", "test": "zsre/ZsRE-test-1000.json"},
    "counterfact": {"train": "counterfact/counterfact-val_easyedit.json",
                    "test": "counterfact/counterfact_500.json"},
}
SPLITS = ("train", "validation", "test")
# name -> named datasets pooled split by split (validation and train shuffled together,
# seeded; test in order); `val_size` may then map each part to its own validation size
MIXED = {"mixed": ("zsre", "counterfact")}


@dataclass
class Fact:
    """One fact to edit: make the model answer `prompt` with `target`."""

    prompt: str
    target: str
    rephrases: list[str] = field(default_factory=list)
    subject: str = ""
    loc_prompts: list[str] = field(default_factory=list)
    loc_answers: list[str] = field(default_factory=list)
    ground_truth: str = ""
    id: str = ""
    loc_kind: str = ""

    def __post_init__(self):
        """Validated and normalised once (`text.check_text`), for every entry point."""
        where = f"fact {self.id}" if self.id else f"fact {self.prompt!r}"
        self.prompt = check_text(self.prompt, f"{where}: prompt")
        self.target = check_text(self.target, f"{where}: target")
        if key(self.prompt) == key(self.target):
            raise ValueError(f"{where}: the target equals the prompt ({self.target!r})")
        for name in ("rephrases", "loc_prompts", "loc_answers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: {name} must be a list of strings, got {value!r}")
        self.rephrases = [check_text(r, f"{where}: rephrase {j}")
                          for j, r in enumerate(self.rephrases)]
        if self.loc_kind not in LOC_KINDS:
            raise ValueError(f"{where}: loc_kind must be one of {LOC_KINDS}, got "
                             f"{self.loc_kind!r}")
        if len(self.loc_prompts) != len(self.loc_answers):
            raise ValueError(f"{where}: {len(self.loc_prompts)} locality prompts but "
                             f"{len(self.loc_answers)} answers")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ formats


def _first(value):
    return value[0] if isinstance(value, list) else value


def _mend_zsre(r: dict) -> Fact:
    loc = r["loc"].removeprefix("nq question: ")
    loc = loc[:1].upper() + loc[1:] + ("" if loc.endswith("?") else "?")
    return Fact(prompt=r["src"], target=r["alt"], rephrases=[r["rephrase"]], subject=r["subject"],
                loc_prompts=[loc], loc_answers=[r["loc_ans"]], loc_kind="nq",
                ground_truth=_first(r.get("answers") or [r.get("pred") or ""]))


def _knowedit(r: dict) -> Fact:
    loc = r.get("locality") or {}
    if isinstance(loc, str):
        loc = json.loads(loc)
    pairs = [(x["prompt"], _first(x["ground_truth"])) for group in loc.values() for x in group]
    return Fact(prompt=r["prompt"], target=r["target_new"], rephrases=[r["rephrase_prompt"]],
                subject=r.get("subject", ""), loc_prompts=[p for p, _ in pairs],
                loc_answers=[a for _, a in pairs], ground_truth=_first(r.get("ground_truth", "")),
                loc_kind="subject" if set(loc) <= {"Relation_Specificity"} else "")


def _rome_counterfact(r: dict) -> Fact:
    rw = r["requested_rewrite"]
    true = rw["target_true"]["str"]
    neighbours = r.get("neighborhood_prompts") or []
    return Fact(prompt=rw["prompt"].format(rw["subject"]), target=rw["target_new"]["str"],
                rephrases=list(r.get("paraphrase_prompts") or []), subject=rw["subject"],
                loc_prompts=list(neighbours), loc_answers=[true] * len(neighbours),
                loc_kind="neighbour", ground_truth=true, id=str(r.get("case_id", "")))


def _easyedit_counterfact(r: dict) -> Fact:
    return Fact(prompt=r["prompt"], target=r["target_new"], rephrases=[r["rephrase_prompt"]],
                subject=r.get("subject", ""), loc_prompts=[r["locality_prompt"]],
                loc_answers=[r["locality_ground_truth"]], loc_kind="neighbour",
                ground_truth=_first(r.get("ground_truth", "")), id=str(r.get("case_id", "")))


def _toolkit(r: dict) -> Fact:
    keys = Fact.__dataclass_fields__
    fact = {k: v for k, v in r.items() if k in keys}
    for k in ("rephrases", "loc_prompts", "loc_answers"):
        if isinstance(fact.get(k), str):
            fact[k] = [fact[k]]
        elif fact.get(k) is None:
            fact.pop(k, None)
    for k in ("subject", "ground_truth", "id", "loc_kind"):
        if fact.get(k) is None:
            fact.pop(k, None)
    return Fact(**fact)


# format name -> (fields that identify it, converter); checked in this order
FORMATS = {
    "toolkit": ({"prompt", "target"}, _toolkit),
    "mend-zsre": ({"src", "alt", "rephrase", "loc", "loc_ans"}, _mend_zsre),
    "knowedit": ({"prompt", "target_new", "rephrase_prompt", "locality"}, _knowedit),
    "rome-counterfact": ({"requested_rewrite", "paraphrase_prompts"}, _rome_counterfact),
    "easyedit-counterfact": ({"prompt", "target_new", "rephrase_prompt", "locality_prompt",
                              "locality_ground_truth"}, _easyedit_counterfact),
}


def to_fact(record: dict, where: str = "record") -> Fact:
    """Map one record of any known format to a Fact; errors name the record and the problem."""
    if isinstance(record, Fact):
        return record
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, (keys, convert) in FORMATS.items():
        if keys <= record.keys():
            try:
                return convert(record)
            except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
                raise ValueError(f"{where}: malformed {name} record ({type(err).__name__}: "
                                 f"{err})") from None
    known = "; ".join(f"{n}: {sorted(k)}" for n, (k, _) in FORMATS.items())
    raise ValueError(f"{where}: unknown fact format with fields {sorted(record)}. Known formats "
                     f"and their required fields: {known}")


def facts_dataset(facts, source: str = "facts", skip_invalid: bool = False) -> datasets.Dataset:
    """Records of any known format -> a Dataset of fact records, with ids filled in.
    `skip_invalid` drops records that fail validation instead of raising (the shipped zsRE
    training file has 2 records with an empty new target)."""
    rows = []
    for i, r in enumerate(facts):
        try:
            fact = to_fact(r, f"{source}[{i}]")
        except ValueError:
            if skip_invalid:
                continue
            raise
        fact.id = fact.id or f"{source}/{i}"
        rows.append(fact.to_dict())
    return datasets.Dataset.from_list(rows, features=FACT_FEATURES)


def as_facts(dataset) -> list[Fact]:
    return [Fact(**row) for row in dataset]


# ------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[dict]:
    """Records of a .json (array), .jsonl, .json.gz or .jsonl.gz file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a data file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({type(err).__name__}: {err})") from None
    stem = path.name.removesuffix(".gz")
    if stem.endswith(".jsonl"):
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at "
                                     f"column {err.colno})") from None
        return data
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def split_groups(facts: list[Fact], val_size: int, seed: int) -> tuple[list[Fact], list[Fact]]:
    """(train, validation): facts sharing a subject or a prompt stay together (union-find)."""
    parent = list(range(len(facts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for i, f in enumerate(facts):
        for group in (("s", key(f.subject)), ("p", key(f.prompt))):
            if group[1]:
                parent[find(i)] = find(owner.setdefault(group, i))
    groups = {}
    for i in range(len(facts)):
        groups.setdefault(find(i), []).append(i)
    order = sorted(groups.values())
    random.Random(seed).shuffle(order)
    val, train = [], []
    for group in order:
        (val if len(val) < val_size else train).extend(group)
    return [facts[i] for i in sorted(train)], [facts[i] for i in sorted(val)]


def _training_file(name: str) -> list[Fact]:
    """The facts of a named dataset's training file (fresh copies)."""
    return as_facts(facts_dataset(read_records(ASSETS / FACT_DATASETS[name]["train"]), name,
                                  skip_invalid=True))


def nq_probes(split: str, seed: int = 0) -> list[tuple[str, str]]:
    """zsRE's held-out NQ questions with their answers, for LS_NQ: `NQ_PROBES` for
    "validation" and as many others for "test", drawn (seeded) from the distinct questions of
    the zsRE training file; their facts keep no locality prompt in train and validation, so
    no training loss ever sees them."""
    if split not in ("validation", "test"):
        raise ValueError(f"NQ probes exist for the validation and test splits, not {split!r}")
    pairs = {}
    for f in _training_file("zsre"):
        if f.loc_kind == "nq":
            pairs.setdefault(key(f.loc_prompts[0]), (f.loc_prompts[0], f.loc_answers[0]))
    order = [pairs[k] for k in sorted(pairs)]
    random.Random(seed).shuffle(order)
    return order[:NQ_PROBES] if split == "test" else order[NQ_PROBES:2 * NQ_PROBES]


@functools.cache
def _held_out_questions() -> frozenset[str]:
    return frozenset(key(q) for split in ("validation", "test") for q, _ in nq_probes(split))


def _without_probes(fact: Fact) -> Fact:
    """`fact` without its NQ locality prompt when that question is an LS_NQ probe."""
    if fact.loc_kind == "nq" and key(fact.loc_prompts[0]) in _held_out_questions():
        fact.loc_prompts, fact.loc_answers, fact.loc_kind = [], [], ""
    return fact


def load_facts(name_or_path: str, split: str = "train", val_size: int | Mapping = 128,
               seed: int = 0, limit: int | None = None) -> datasets.Dataset:
    """Facts of a named dataset (`FACT_DATASETS`), a JSON/JSONL file or a hub dataset.

    Named datasets have train/validation/test splits (module docstring); `MIXED` names pool
    them (`val_size` an int for each part or a mapping part -> size). A file has
    train/validation (the same seeded split) and "all". A hub dataset takes `split` as the
    hub's split name.
    """
    if name_or_path in MIXED:
        facts = []
        for part in MIXED[name_or_path]:
            size = val_size[part] if isinstance(val_size, Mapping) else val_size
            facts += as_facts(load_facts(part, split, size, seed))
        if split != "test":
            random.Random(seed).shuffle(facts)
    elif name_or_path in FACT_DATASETS:
        files = FACT_DATASETS[name_or_path]
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of {name_or_path}; choose one of {SPLITS}")
        test = as_facts(facts_dataset(read_records(ASSETS / files["test"]), f"{name_or_path}-test",
                                      skip_invalid=True))
        if split == "test":
            facts = test
        else:
            pool = _training_file(name_or_path)
            seen = {key(f.subject) for f in test if f.subject} | {key(f.prompt) for f in test}
            pool = [f for f in pool if key(f.subject) not in seen and key(f.prompt) not in seen]
            pool = [_without_probes(f) for f in pool]
            train, val = split_groups(pool, val_size, seed)
            facts = train if split == "train" else val
    elif Path(name_or_path).suffix in (".json", ".jsonl", ".gz") or Path(name_or_path).exists():
        records = read_records(name_or_path)
        if not records:
            raise ValueError(f"no facts in {name_or_path}")
        all_facts = as_facts(facts_dataset(records, Path(name_or_path).stem))
        if split == "all":
            facts = all_facts
        elif split in ("train", "validation"):
            train, val = split_groups(all_facts, val_size, seed)
            facts = train if split == "train" else val
        else:
            raise ValueError(
                f"a fact file has splits 'train', 'validation' and 'all', not {split!r}")
    else:
        try:
            hub = datasets.load_dataset(name_or_path, split=split)
        except Exception as err:
            raise FileNotFoundError(
                f"cannot load facts {name_or_path!r}: not a named dataset {sorted(FACT_DATASETS)}, "
                f"not a .json/.jsonl file, and the hub refused it ({type(err).__name__}: {err})"
            ) from None
        facts = as_facts(facts_dataset(hub, name_or_path.replace("/", "_")))
    if limit is not None:
        facts = facts[:limit]
    return datasets.Dataset.from_list([f.to_dict() for f in facts], features=FACT_FEATURES)
