"""lm-evaluation-harness tasks on a resident, perturbed model (issue 14).

    from sensray.tasks import TaskScorer
    scorer = TaskScorer(model, tokenizer, ["sensray-pydoc-choice", "sensray-pydoc-ppl"], limit=50)
    scorer.score().columns          # {"sensray-pydoc-choice/acc": 0.98, ...}

    sensray evaluate --model sensray-tiny --tasks sensray-pydoc-choice,sensray-pydoc-ppl
    sensray sweep experiments/ablation-tasks.yaml       # eval: {tasks: [...], top_k: 8}

Modules: `shipped` (sensray's offline tasks, sensray/assets/tasks/), `catalog` (names, the
dry-run checks, loading), `scorer` (HFLM over the live model), `selection` (which trials of a
sweep score tasks: all, every n-th, or the top-k by damage after the sweep). lm-eval is an
optional dependency (`pip install 'sensray[tasks]'`): nothing here imports it until a spec or
command asks for tasks.
"""

from sensray.tasks.catalog import SCORABLE, Catalog, require_lm_eval
from sensray.tasks.scorer import TaskResult, TaskScorer
from sensray.tasks.shipped import shipped_names

__all__ = ["SCORABLE", "Catalog", "TaskResult", "TaskScorer", "require_lm_eval", "shipped_names"]
