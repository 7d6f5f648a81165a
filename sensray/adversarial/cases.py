"""The inputs an attack works on: token ids per case, built once on the driver from the spec and the tokenizer.

    cases = build_cases(spec, tokenizer, context=256)   # SpecError (exit 2) for any bad input
    cases[0].before, cases[0].after, cases[0].target     # token ids; the edit goes between before and after

A case is `before + [edit] + after + target`: the attack inserts a suffix between `before` and
`after` (edit: suffix) or replaces tokens of `before[fixed:]` (edit: substitute), and its loss is
scored on `target`. Untargeted cases are windows of the eval corpus (prompt_tokens of prompt, then
continuation_tokens of true continuation as the target), spread evenly over it; targeted cases
take prompts from a file (or the same windows) and targets from a file or one string. With
`chat_template`, the prompt and suffix sit inside the user turn and `after` is the template's tail.
Everything is checked here, before a weight is loaded: files empty, not UTF-8 or too long for the
model's context, a suffix longer than the context, a target that tokenizes to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sensray.adversarial.spec import AdversarialSpec
from sensray.errors import SpecError

MAX_INPUT_BYTES = 2**24  # a prompts or targets file is a list of lines; 16 MiB is far beyond any real one
PLACEHOLDER = "{optim_str}"  # where the suffix goes in a rendered chat template (nanoGCG's marker)
DEFAULT_WINDOWS = 4


@dataclass(frozen=True)
class Case:
    index: int
    source: str  # where it came from: "corpus window 17", "prompts.txt:3"
    before: tuple[int, ...]  # tokens before the edit (prompt; with a chat template, the template's head too)
    after: tuple[int, ...]  # tokens between the edit and the target (a chat template's tail), usually none
    target: tuple[int, ...]  # the tokens whose loss is scored: the true continuation, or the target
    fixed: int = 0  # leading tokens of `before` a substitution never touches (BOS)

    def to_json(self) -> dict:
        return {"case": self.index, "source": self.source, "before": list(self.before), "after": list(self.after),
                "target": list(self.target), "fixed": self.fixed}

    @classmethod
    def from_json(cls, raw: dict) -> "Case":
        return cls(raw["case"], raw["source"], tuple(raw["before"]), tuple(raw["after"]), tuple(raw["target"]),
                   raw["fixed"])


def build_cases(spec: AdversarialSpec, tokenizer, context: int | None) -> list[Case]:
    """Every case of the spec, checked against the tokenizer and the model's context length."""
    check_init(spec, tokenizer)
    inputs = spec.inputs
    if inputs.prompts is not None:
        prompts = [(f"{inputs.prompts}:{n}", text) for n, text in read_lines(inputs.prompts, "inputs.prompts")]
        if inputs.cases is not None and inputs.cases > len(prompts):
            raise SpecError("inputs.cases", f"{inputs.cases} asked for, {inputs.prompts} has {len(prompts)} prompts")
        prompts = prompts[: inputs.cases]
        cases = [_prompt_case(i, where, text, spec, tokenizer) for i, (where, text) in enumerate(prompts)]
    else:
        cases = corpus_cases(spec, tokenizer)
    if spec.targeted:
        cases = with_targets(cases, spec, tokenizer)
    for case in cases:
        check_fits(case, spec, context)
    return cases


def check_init(spec: AdversarialSpec, tokenizer) -> None:
    """A suffix starts as `init` repeated: it must be exactly one token."""
    ids = tokenizer(spec.attack.init, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise SpecError("attack.init", f"{spec.attack.init!r} is {len(ids)} tokens for this tokenizer; give text "
                                       "that is exactly one token (e.g. ' x' or ' !')")


def read_lines(path: str, key: str) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line of a UTF-8 file."""
    from sensray.data import read_text

    file = Path(path)
    if not file.is_file():
        raise SpecError(key, f"no such file {path!r}")
    if file.stat().st_size > MAX_INPUT_BYTES:
        raise SpecError(key, f"{path} is larger than {MAX_INPUT_BYTES // 2**20} MiB; give one line per case")
    lines = [(n, line) for n, line in enumerate(read_text(file, key).splitlines(), start=1) if line.strip()]
    if not lines:
        raise SpecError(key, f"{path} is empty (no non-blank line); give one per line")
    return lines


def corpus_cases(spec: AdversarialSpec, tokenizer) -> list[Case]:
    """Evenly spread windows of the corpus: prompt_tokens of prompt, then continuation_tokens of target."""
    from sensray.data import load_text, token_windows
    from sensray.spec import DataSpec

    inputs = spec.inputs
    prompt, cont = inputs.prompt_tokens, inputs.continuation_tokens
    data = DataSpec(corpus=inputs.corpus, split=inputs.split, text_field=inputs.text_field)
    try:
        windows = token_windows(tokenizer, load_text(data), prompt + cont, None)
    except SpecError as err:  # the data module names its own keys (data.corpus, data.seq_len): say ours
        key = "inputs.prompt_tokens" if err.path == "data.seq_len" else err.path.replace("data.", "inputs.")
        raise SpecError(key, err.message) from None
    count = inputs.cases or DEFAULT_WINDOWS
    if count > len(windows):
        raise SpecError("inputs.cases", f"{count} windows of {prompt + cont} tokens asked for, the corpus has "
                                        f"{len(windows)}")
    picks = np.linspace(0, len(windows) - 1, count).round().astype(int).tolist()
    special = set(tokenizer.all_special_ids)
    cases = []
    for i, w in enumerate(picks):
        ids = windows[w].tolist()
        fixed = next((n for n, t in enumerate(ids[:prompt]) if t not in special), prompt)
        cases.append(Case(i, f"corpus window {w}", tuple(ids[:prompt]), (), tuple(ids[prompt:]), fixed))
    return cases


def _prompt_case(index: int, where: str, text: str, spec: AdversarialSpec, tokenizer) -> Case:
    if spec.inputs.chat_template:
        before, after = chat_parts(text, tokenizer, spec.model.name)
        return Case(index, where, before, after, ())
    ids = tuple(tokenizer(text).input_ids)
    special = set(tokenizer.all_special_ids)
    fixed = next((n for n, t in enumerate(ids) if t not in special), len(ids))
    return Case(index, where, ids, (), (), fixed)


def chat_parts(prompt: str, tokenizer, model: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chat template around `prompt + suffix`, as token ids before and after the suffix."""
    if not getattr(tokenizer, "chat_template", None):
        raise SpecError("inputs.chat_template", f"the tokenizer of {model!r} has no chat template")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt + PLACEHOLDER}], tokenize=False,
                                             add_generation_prompt=True)
    if rendered.count(PLACEHOLDER) != 1:
        raise SpecError("inputs.prompts", f"a prompt may not contain {PLACEHOLDER!r} (the suffix's place)")
    head, tail = rendered.split(PLACEHOLDER)
    # The template writes special tokens (BOS) as text: encode without adding them a second time.
    encode = lambda s: tuple(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    return encode(head), encode(tail)


def with_targets(cases: list[Case], spec: AdversarialSpec, tokenizer) -> list[Case]:
    """The targeted cases: each prompt with its target (one line per prompt, or one for all)."""
    inputs = spec.inputs
    if inputs.target is not None:
        targets = [("inputs.target", inputs.target)] * len(cases)
    else:
        lines = [(f"{inputs.targets}:{n}", text) for n, text in read_lines(inputs.targets, "inputs.targets")]
        if len(lines) not in (1, len(cases)):
            raise SpecError("inputs.targets", f"{inputs.targets} has {len(lines)} targets for {len(cases)} prompts; "
                                              "give one per prompt, or one for all")
        targets = lines * len(cases) if len(lines) == 1 else lines
    out = []
    for case, (where, text) in zip(cases, targets):
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        if not ids:
            key = "inputs.target" if where == "inputs.target" else "inputs.targets"
            raise SpecError(key, f"{where}: the target {text!r} tokenizes to no tokens")
        out.append(Case(case.index, case.source, case.before, case.after, ids, case.fixed))
    return out


def check_fits(case: Case, spec: AdversarialSpec, context: int | None) -> None:
    """The longest input the attack builds for this case fits the model's context."""
    editable = len(case.before) - case.fixed
    if spec.attack.edit == "substitute" and spec.attack.budgets[-1] > editable:
        raise SpecError("attack.budgets", f"{case.source}: substituting up to {spec.attack.budgets[-1]} tokens needs "
                                          f"as many editable prompt tokens; it has {editable}")
    if context is None:  # a family without a position limit (ALiBi)
        return
    budget = spec.attack.budgets[-1] if spec.attack.edit == "suffix" else 0
    if budget >= context:
        raise SpecError("attack.budgets", f"a {budget}-token suffix does not fit the model's context of {context} "
                                          "tokens")
    total = len(case.before) + budget + len(case.after) + len(case.target)
    if total > context:
        key = "inputs.prompts" if spec.inputs.prompts and case.source.startswith(spec.inputs.prompts) else (
            "inputs.targets" if spec.targeted else "inputs.prompt_tokens")
        raise SpecError(key, f"{case.source}: {len(case.before) + len(case.after)} prompt tokens + a {budget}-token "
                             f"suffix + {len(case.target)} target tokens = {total}, more than the model's context "
                             f"of {context} tokens")
