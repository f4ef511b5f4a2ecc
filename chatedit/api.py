"""The editing API: fix facts in a chat model from Python, keep a record, undo, ship.

    from chatedit import Editor

    ed = Editor.from_pretrained("smollm2-135m-instruct", "outputs/train/.../checkpoint.safetensors")
    result = ed.edit([{"prompt": "Who wrote Dune?", "target": "Frank Herbert"}])
    print(result)                 # per-fact success, greedy answers, timing
    ed.rollback()                 # weights bitwise as before
    ed.save_edits("my-edits")     # only the shifts (safetensors) + metadata
    ed.export_lora("my-lora", rank=16)

The weights of the edited modules are always base (fp32 master) + the sum of the applied
batches' shifts, recomputed in order; rollback therefore restores them bitwise.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .data import Fact
from .editors import EditMethod
from .extras import require
from .files import atomic_folder, check_folder, tensors_digest
from .lm import accuracy, padded
from .methods import get_method
from .models import edit_modules, kv_shape, load_model
from .text import check_text, exact_match, key
from .timing import Laps, sync

EDITS_FILE = "edits.safetensors"
ROLES = ("system", "user", "assistant")  # the chat roles `Editor.chat` accepts
MAX_SHIFT_RATIO = 10.0  # a loaded shift larger than this times its weights' norm is refused


@dataclass
class FactResult:
    prompt: str
    target: str
    token_accuracy: float   # teacher-forced: share of the target's tokens predicted
    answer: str             # greedy answer after the edit
    exact_match: bool       # normalised answer == normalised target


@dataclass
class EditResult:
    facts: list[FactResult]   # empty when the edit was not checked (edit(..., check=False))
    seconds: dict[str, float]
    n_facts: int = 0

    @property
    def success(self) -> float:
        if not self.facts:
            return math.nan
        return sum(f.token_accuracy for f in self.facts) / len(self.facts)

    @property
    def exact_match(self) -> float:
        if not self.facts:
            return math.nan
        return sum(f.exact_match for f in self.facts) / len(self.facts)

    def __str__(self) -> str:
        if not self.facts:
            return f"{self.n_facts} facts edited in {self.seconds['edit']:.2f}s (not checked)"
        lines = [f"{len(self.facts)} facts edited in {self.seconds['edit']:.2f}s: token accuracy "
                 f"{self.success:.3f}, exact match {self.exact_match:.3f}"]
        for f in self.facts:
            lines.append(f"  {f.prompt[:50]!r:<54} -> {f.target[:24]!r:<28} "
                         f"acc {f.token_accuracy:.2f}  answer {f.answer[:60]!r}")
        return "\n".join(lines)


@dataclass
class EditBatch:
    facts: list[dict]
    shifts: dict[str, torch.Tensor] = field(repr=False)
    time: str = ""
    stats: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # what later
    # batches need of this one (`Shifts.stats`; MALMEN: keys and value shifts, AlphaEdit: K^T K)


def _as_dict(fact, i: int) -> dict:
    """One fact as a dict, validated and normalised by `data.Fact` (the one fact check)."""
    if isinstance(fact, dict):
        fields = {k: fact[k] for k in ("prompt", "target", "rephrases", "subject") if k in fact}
        fields["rephrases"] = fields.get("rephrases") or []
        fields["subject"] = fields.get("subject") or ""
        fact = Fact(**fields, id=str(i))  # errors read "fact <i>: ..."
    if not isinstance(fact, Fact):
        raise TypeError(f"fact {i} must be a dict with 'prompt' and 'target' or a Fact, got "
                        f"{type(fact).__name__}")
    return {"prompt": fact.prompt, "target": fact.target, "rephrases": list(fact.rephrases),
            "subject": fact.subject}


def check_facts(facts, history=()) -> list[dict]:
    """Facts as dicts, with clear errors for bad ones (nothing is edited before this passes).
    Prompts are compared by `text.key` (case and inner whitespace do not matter) within the
    call and against the facts of the applied batches in `history`: one prompt with two
    targets is an error naming both facts; an exact duplicate is dropped with a warning."""
    if isinstance(facts, dict | Fact):
        facts = [facts]
    if facts is None or isinstance(facts, str | bytes) or not hasattr(facts, "__iter__"):
        raise TypeError(f"facts must be a list of dicts with 'prompt' and 'target' (or Fact "
                        f"records), got {type(facts).__name__}")
    facts = [_as_dict(f, i) for i, f in enumerate(facts)]
    if not facts:
        raise ValueError("no facts given to edit")
    seen = {key(f["prompt"]): (f"fact {j} of applied batch {b}", f)
            for b, batch in enumerate(history) for j, f in enumerate(batch.facts)}
    out = []
    for i, f in enumerate(facts):
        where, other = seen.get(key(f["prompt"]), (None, None))
        if other is not None and key(other["target"]) != key(f["target"]):
            raise ValueError(f"fact {i} ({f['prompt']!r} -> {f['target']!r}) contradicts {where} "
                             f"({other['prompt']!r} -> {other['target']!r}): conflicting targets "
                             "for one prompt")
        if other is not None:
            warnings.warn(f"fact {i} ({f['prompt']!r} -> {f['target']!r}) duplicates {where}; "
                          "dropped", stacklevel=3)
            continue
        seen[key(f["prompt"])] = (f"fact {i}", f)
        out.append(f)
    if not out:
        raise ValueError("nothing to edit: every fact given is already applied")
    return out


def check_subjects(facts, rows, method: str) -> None:
    """Every fact names a subject found in its prompt (locate-then-edit methods)."""
    for i, (f, r) in enumerate(zip(facts, rows)):
        if not f["subject"]:
            raise ValueError(f"fact {i} ({f['prompt']!r} -> {f['target']!r}) has no subject; "
                             f"{method} edits at the subject's last token: give 'subject'")
        if r["subject_last"] < 0:
            raise ValueError(f"fact {i}: its subject {f['subject']!r} does not occur in its "
                             f"prompt {f['prompt']!r}; {method} edits at the subject's last "
                             "token")


def _same(batches, others) -> bool:
    """Whether two lists hold the same batch objects in the same order."""
    return len(batches) == len(others) and all(a is b for a, b in zip(batches, others))


def weights_fingerprint(master: dict[str, torch.Tensor]) -> str:
    """sha256 of the unedited weights of the edited modules (names, shapes and values)."""
    return tensors_digest(sorted(master.items()))


class Editor:
    """A chat model with an editor attached. Build it with `from_pretrained`."""

    def __init__(self, method: EditMethod, name: str, answer_tokens: int = 24,
                 checkpoint_path=None):
        self.method, self.name = method, name
        self.answer_tokens, self.checkpoint_path = answer_tokens, checkpoint_path
        self.history: list[EditBatch] = []
        self._summed: tuple[list, dict] = ([], {})  # total_shift's last batches and sum
        # the method's running solve (`Shifts.state`) over exactly these batches
        self._solved: tuple[list, object] = ([], None)
        self.fingerprint = weights_fingerprint(method.master)

    lm = property(lambda self: self.method.lm)  # the loaded model (lm.ChatLM)
    model = property(lambda self: self.lm.model)
    tokenizer = property(lambda self: self.lm.tokenizer)

    # ------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, model, editor_checkpoint=None, tokenizer=None, *,
                        method: str | None = None, strict: bool = True, **overrides) -> Editor:
        """`model`: a registry name, a local folder or hub id, or a loaded transformers model
        (then pass `tokenizer`). `editor_checkpoint`: a `checkpoint.safetensors` written by
        scripts/train.py, which names its method (MALMEN or MEND); without one, `method`
        picks an editing method that needs no meta-training (`chatedit.methods`: "ft", the
        default, "memit", "alphaedit" or "none").

        Overrides: dtype, device (loading by name); system (system prompt), answer_tokens;
        the method's options (its config dataclass): for a trained editor only the test-time
        ones (step_scale, joint, hyper_chunk, solve_memory_gb, out_mu, out_bins), otherwise
        any (FT: steps, lr; MEMIT / AlphaEdit: chatedit.memit); without a checkpoint, module
        and layers (default: the method's own, `MethodSpec.default_edit`).
        `strict=False` allows a checkpoint trained on a model of another name (same modules)."""
        meta, tensors = {}, {}
        if editor_checkpoint is not None:
            tensors, meta = checkpoint.load(editor_checkpoint)
            if not any(k.startswith("hypernet.") for k in tensors) or "config" not in meta:
                raise ValueError(f"{editor_checkpoint} is not an editor checkpoint written by "
                                 "scripts/train.py (no hypernetwork weights or config)")
        cfg = meta.get("config", {})
        if isinstance(model, str | Path):
            model_cfg = cfg.get("model", {})
            model, tokenizer = load_model(
                str(model), dtype=overrides.pop("dtype", model_cfg.get("dtype")),
                device=overrides.pop("device", None),
                chat_template=model_cfg.get("chat_template", True))
        elif tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: from_pretrained(model, ckpt, "
                             "tokenizer=tok)")
        name = str(model.config.name_or_path)
        system = overrides.pop("system", cfg.get("model", {}).get("system_prompt"))
        answer_tokens = overrides.pop("answer_tokens", 24)
        if editor_checkpoint is None:
            found = get_method(method or "ft")
            if found.meta_trained:
                raise ValueError(f"editing method {found.name!r} is meta-trained: pass the "
                                 "checkpoint scripts/train.py wrote for it")
            module, layers = found.default_edit(model)
            modules = edit_modules(model, overrides.pop("module", None) or module,
                                   overrides.pop("layers", None) or layers)
            config, state = found.config_from(**overrides), None
        else:
            found, modules = cls._trained(model, meta, name, strict, method)
            wrong = sorted(set(overrides) - found.test_time)
            if wrong:
                raise TypeError(f"unknown overrides: {wrong} (a trained editor's other options "
                                f"come from its checkpoint; test-time ones: "
                                f"{sorted(found.test_time)})")
            config = found.saved_config(meta["config"]["editor"], **overrides)
            state = checkpoint.unprefixed(tensors, "hypernet.")
        method = found.cls.from_config(model, tokenizer, modules, config, system, state)
        return cls(method, name, answer_tokens, editor_checkpoint)

    @classmethod
    def quick(cls, model: str = "smollm2-135m-instruct", data: str = "zsre",
              train_overrides=None, **overrides) -> Editor:
        """`model` (a name with a chatedit/conf/model entry) with a quick MALMEN editor:
        meta-trained once with a small recipe (`chatedit.training.quick.QUICK`, or
        `train_overrides` of chatedit-train), a few minutes on a CPU, cached and reused
        after; `overrides` go to `from_pretrained`. Training code is imported only here,
        when asked for."""
        from .training.quick import quick_editor

        return cls.from_pretrained(model, quick_editor(model, data, train_overrides),
                                   **overrides)

    @staticmethod
    def _trained(model, meta, name, strict, method):
        """The method and the edited modules a checkpoint names, checked against `model`."""
        trained_for = meta.get("model")
        if strict and trained_for != name:
            raise ValueError(f"the editor checkpoint was trained for model {trained_for!r}, not "
                             f"{name!r}; pass strict=False to use it anyway")
        edit = (meta["config"].get("model") or {}).get("edit") or {}
        if not {"module", "layers"} <= set(edit) or "modules" not in meta \
                or "editor" not in meta["config"]:
            raise ValueError(f"the editor checkpoint's config lacks model.edit (module, layers), "
                             f"editor or the edited module names (its config has "
                             f"{sorted(meta['config'])}); was it written by scripts/train.py?")
        rule = meta["config"]["editor"].get("rule")
        if method is not None and method != rule:
            raise ValueError(f"the editor checkpoint holds a {rule!r} editor, not {method!r}")
        try:
            modules = edit_modules(model, edit["module"], list(edit["layers"]))
        except ValueError as err:
            raise ValueError(f"the editor checkpoint edits {edit['module']} in layers "
                             f"{list(edit['layers'])}, which this model lacks: {err}") from None
        if list(modules) != list(meta["modules"]):
            raise ValueError(f"the editor checkpoint edits {meta['modules']}, this model resolves "
                             f"them to {list(modules)}")
        return get_method(rule), modules

    # -------------------------------------------------------------- editing
    @property
    def modules(self) -> dict:
        return self.method.modules

    def total_shift(self, batches=None) -> dict[str, torch.Tensor]:
        """Sum of the shifts of `batches` (default: all applied), added in order. The last
        sum is kept: when `batches` starts with its batches, only the rest are added to it
        (the same additions in the same order, so the same bits), and a batch in turn costs
        one addition, not one per batch edited so far."""
        batches = self.history if batches is None else batches
        done, total = self._summed
        if not done or len(done) > len(batches) or not _same(done, batches[:len(done)]):
            done, total = [], {n: torch.zeros_like(w) for n, w in self.method.master.items()}
        total = dict(total)  # its tensors are replaced, never written in place
        for b in batches[len(done):]:
            for n in total:
                total[n] = total[n] + b.shifts[n].to(total[n])  # shifts are kept on the CPU
        self._summed = (list(batches), total)
        return dict(total)

    def _write(self, batches) -> None:
        """Weights <- master + total shift of `batches`; raises before writing anything if a
        shift is not finite or has the wrong shape."""
        self.method.apply(self.total_shift(batches))

    def edit(self, facts, check: bool = True) -> EditResult:
        """Edit all `facts` at once, on top of the edits already applied. Facts are dicts
        {"prompt", "target", optional "rephrases", "subject"} or `Fact` records. With `check`,
        measure each fact after the edit (teacher-forced accuracy, greedy answer): most of
        the time for large batches. Atomic: on any error or interrupt (BaseException), before
        or after the shift is applied, the weights and `history` stay exactly as they were."""
        facts = check_facts(facts, self.history)
        for i, f in enumerate(facts):  # stored in history and saved edits: no control tokens
            for j, text in enumerate(f["rephrases"]):
                check_text(text, f"fact {i}: rephrase {j}", self.tokenizer)
            if f["subject"]:
                check_text(f["subject"], f"fact {i}: subject", self.tokenizer)
        start = time.perf_counter()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        rows = [self.lm.encode(f["prompt"], f["target"], f["subject"] or None, limit)
                for f in facts]
        if self.method.needs_subject:
            check_subjects(facts, rows, type(self.method).__name__)
        before = list(self.history)
        solved, state = self._solved
        self._solved = ([], None)  # taken: the method may update it in place
        laps = Laps(sync(next(self.model.parameters()).device))
        out = self.method.compute_shifts(
            padded(self.model, self.tokenizer, rows), [b.stats for b in before],
            state if _same(solved, before) else None, laps)
        batch = EditBatch(facts, {n: s.detach().float().cpu() for n, s in out.shifts.items()},
                          time.strftime("%Y-%m-%dT%H:%M:%S"), out.stats)
        try:
            self._write(before + [batch])
            self.history = before + [batch]
            self._solved = (list(self.history), out.state)
            seconds = {**laps.seconds, "edit": time.perf_counter() - start}
            result = self._check(facts, rows) if check else []
        except BaseException:
            self.history, self._solved = before, ([], None)
            self._write(before)
            raise
        seconds["check"] = time.perf_counter() - start - seconds["edit"]
        return EditResult(result, seconds, len(facts))

    def _check(self, facts, rows) -> list[FactResult]:
        preds = self.lm.predictions(rows)
        answers = self.lm.generate([f["prompt"] for f in facts], self.answer_tokens)
        return [FactResult(f["prompt"], f["target"], accuracy([p]), a, exact_match(a, f["target"]))
                for f, p, a in zip(facts, preds, answers)]

    def rollback(self, all: bool = False) -> None:  # noqa: A002 (the API's word)
        """Undo the last edit batch (or every batch); weights bitwise as before it."""
        if not self.history:
            raise IndexError("nothing to roll back: no edits applied")
        self.history = [] if all else self.history[:-1]
        self._write(self.history)

    # ------------------------------------------------------------- talking
    def generate(self, prompt: str | list[str], max_new_tokens: int = 64) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        out = self.lm.generate(prompts, max_new_tokens)
        return out[0] if isinstance(prompt, str) else out

    @torch.no_grad()
    def chat(self, messages: list[dict], max_new_tokens: int = 64) -> str:
        """The assistant's greedy reply to a conversation [{"role", "content"}, ...]: roles
        are "system", "user" or "assistant"; any field holding one of the tokenizer's control
        tokens is refused, as in every other entry point."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list of {{role, content}} dicts, "
                             f"got {messages!r}"[:200])
        checked = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content"}:
                raise ValueError(f"message {i} must be a dict with only 'role' and 'content', "
                                 f"got {m!r}"[:200])
            if m.get("role") not in ROLES:
                raise ValueError(f"message {i} has role {m.get('role')!r}; roles are "
                                 f"{', '.join(ROLES)}")
            checked.append({"role": m["role"], "content": check_text(
                m.get("content"), f"message {i} content", self.tokenizer)})
        messages = checked
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        ids = {k: v.to(next(self.model.parameters()).device) for k, v in ids.items()}
        out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                     skip_special_tokens=True).strip()

    # ---------------------------------------------------------- save / load
    def save_pretrained(self, folder) -> None:
        """The full edited checkpoint, loadable by plain transformers (written atomically:
        a path that exists and is not a folder is an error before anything is written)."""
        with atomic_folder(folder) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

    def save_edits(self, folder, overwrite: bool = False) -> Path:
        """Only the shifts of every applied batch (safetensors) and their metadata. Refused
        with an empty history (nothing to save), and over an edits file that holds a batch
        this editor's history does not (it would be lost) unless `overwrite`."""
        if not self.history:
            raise ValueError(f"no edits to save to {folder}: this editor's history is empty "
                             "(edit or load_edits first); nothing was written")
        path = check_folder(folder) / EDITS_FILE
        if path.exists() and not overwrite:
            _, meta = checkpoint.load(path, with_tensors=False)
            ours = {(b.time, json.dumps(b.facts)) for b in self.history}
            lost = [b for b in meta.get("batches") or []
                    if (b.get("time"), json.dumps(b.get("facts"))) not in ours]
            if lost:
                raise FileExistsError(
                    f"{path} holds {len(lost)} batch(es) of edits that this editor has not "
                    f"applied (the first of {lost[0].get('time')}, "
                    f"{len(lost[0].get('facts') or [])} facts); saving would lose them. "
                    "load_edits it first, save elsewhere, or pass overwrite=True")
        tensors = {f"{i}.{n}": s for i, b in enumerate(self.history) for n, s in b.shifts.items()}
        tensors.update({f"{i}.stats.{n}": s for i, b in enumerate(self.history)
                        for n, s in b.stats.items()})
        meta = {"base_model": self.name, "fingerprint": self.fingerprint,
                "modules": list(self.modules), "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "batches": [{"facts": b.facts, "time": b.time} for b in self.history]}
        checkpoint.save(path, tensors, meta)
        return path

    def load_edits(self, folder) -> None:
        """Apply edits saved by `save_edits` on top of the current ones (same base model).
        Refused, with the weights unchanged: edits of another base model, a missing or
        misshapen tensor, shifts that are not finite or larger than `MAX_SHIFT_RATIO` times
        the weights, and batches already in `history`."""
        path = Path(folder)
        path = path / EDITS_FILE if path.is_dir() else path
        tensors, meta = checkpoint.load(path)
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"these edits were made on {meta.get('base_model')!r} (edited-weights "
                             f"fingerprint {meta.get('fingerprint')}), not on this model "
                             f"{self.name!r} ({self.fingerprint}); refusing to apply them")
        if not isinstance(meta.get("batches"), list):
            raise ValueError(f"{path}: no edit batches in its metadata (not written by save_edits)")
        batches = [EditBatch(b["facts"], self._loaded_shifts(path, tensors, i), b["time"],
                             {k[len(f"{i}.stats."):]: t for k, t in tensors.items()
                              if k.startswith(f"{i}.stats.")})
                   for i, b in enumerate(meta["batches"])]
        applied = {(b.time, json.dumps(b.facts)) for b in self.history}
        again = [b for b in batches if (b.time, json.dumps(b.facts)) in applied]
        if again:
            raise ValueError(f"{path}: its batch of {again[0].time} ({len(again[0].facts)} facts) "
                             "is already applied (in history); refusing to apply it twice")
        self._write(self.history + batches)
        self.history += batches

    def _loaded_shifts(self, path, tensors, i: int) -> dict[str, torch.Tensor]:
        """Batch i's shifts from a loaded edits file, each checked against its module."""
        out = {}
        for name, module in self.modules.items():
            tensor = tensors.get(f"{i}.{name}")
            if tensor is None:
                raise ValueError(f"{path}: tensor {i}.{name} (batch {i}, module {name}) is missing")
            if tuple(tensor.shape) != kv_shape(module):
                raise ValueError(f"{path}: tensor {i}.{name} has shape {tuple(tensor.shape)}, the "
                                 f"module needs {kv_shape(module)}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{path}: tensor {i}.{name} holds NaN or Inf")
            ratio = (tensor.float().norm() / self.method.master[name].norm()).item()
            if ratio > MAX_SHIFT_RATIO:
                raise ValueError(f"{path}: tensor {i}.{name} is {ratio:.3g} times the norm of the "
                                 f"weights it shifts (at most {MAX_SHIFT_RATIO}); refusing it")
            out[name] = tensor.float()
        return out

    def export_lora(self, folder, rank: int = 16) -> dict[str, float]:
        """The total shift as a PEFT LoRA adapter (truncated SVD per module, scaling 1).
        Returns each module's relative reconstruction error ||S - S_r||_F / ||S||_F."""
        require("peft", "LoRA export")
        from peft import LoraConfig
        from safetensors.torch import save_file
        from transformers.pytorch_utils import Conv1D

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}; nothing written")
        if not self.history:
            raise ValueError("no edits to export")
        weights, errors = {}, {}
        r = min([rank] + [min(kv_shape(m)) for m in self.modules.values()])
        for name, s in self.total_shift().items():
            delta = s.double().T  # out x in, the layout of LoRA's B @ A
            u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
            root = sigma[:r].sqrt()
            b, a = u[:, :r] * root, root[:, None] * vh[:r]
            errors[name] = ((delta - b @ a).norm() / delta.norm().clamp_min(1e-30)).item()
            weights[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous()
            weights[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous()
        conv1d = isinstance(next(iter(self.modules.values())), Conv1D)
        with atomic_folder(folder) as tmp:
            LoraConfig(r=r, lora_alpha=r, target_modules=list(self.modules), lora_dropout=0.0,
                       bias="none", fan_in_fan_out=conv1d, task_type="CAUSAL_LM",
                       base_model_name_or_path=self.name).save_pretrained(tmp)
            save_file(weights, str(tmp / "adapter_model.safetensors"))
            (tmp / "reconstruction_error.json").write_text(json.dumps(errors, indent=2))
        return errors

