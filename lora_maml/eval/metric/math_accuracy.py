"""``math_accuracy``: MATH final-answer accuracy as an :mod:`evaluate` metric, the grader of ``lora-maml eval``.

Load it offline from this file (no Hub access is involved)::

    import evaluate
    from lora_maml.eval.grading import METRIC_PATH   # this file, inside the installed package

    metric = evaluate.load(str(METRIC_PATH))          # or lora_maml.eval.grading.load_metric()
    metric.compute(predictions=["so $\\boxed{0.5}$"], references=["\\frac{1}{2}"])
    # {'accuracy': 1.0, 'strict_accuracy': 0.0}

The evaluation grades its generations through this metric (``return_grades=True``), so the accuracy
of your own generations computed here is judged exactly as the evaluation judges. ``evaluate`` copies
this script into its modules cache before importing it, so everything is imported from the installed
``lora_maml`` package rather than relative to this file.
"""

import datasets
import evaluate

from lora_maml.eval.grading import DEFAULT_TIMEOUT_S, accuracy, grade_batch

_DESCRIPTION = """\
Fraction of generated solutions whose last \\boxed{...} answer equals the reference answer.
`accuracy` judges equality with math-verify (symbolic: \\frac12 = 0.5, \\{1,2\\} = \\{2,1\\});
`strict_accuracy` with a notational normal form only (see lora_maml.eval.grading.normalize_answer).
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): generated solutions; the last \\boxed{...} is the answer.
    references (list of str): reference answers (a full reference solution also works: its
        last box is used).
    timeout_s (int, optional): math-verify timeout per parse/comparison, in seconds.
    return_grades (bool, optional): also return every generation's verdicts (default False).
Returns:
    accuracy (float): fraction judged correct by math-verify.
    strict_accuracy (float): fraction equal after notational normalisation.
    grades (list of dict, with return_grades=True): per generation, as lora_maml.eval.grading.grade:
        {"extracted": the answer compared (None: no box), "math_verify": bool, "strict": bool}.
Examples:
    >>> metric = evaluate.load("lora_maml/eval/metric/math_accuracy.py")
    >>> metric.compute(predictions=["so $\\\\boxed{0.5}$"], references=["\\\\frac{1}{2}"])
    {'accuracy': 1.0, 'strict_accuracy': 0.0}
"""

_CITATION = """\
@article{hendrycksmath2021,
  title={Measuring Mathematical Problem Solving With the MATH Dataset},
  author={Hendrycks, Dan and Burns, Collin and Kadavath, Saurav and Arora, Akul and Basart, Steven
          and Tang, Eric and Song, Dawn and Steinhardt, Jacob},
  journal={NeurIPS},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, timeout_s=DEFAULT_TIMEOUT_S, return_grades=False):
        grades = grade_batch(predictions, references, timeout_s=timeout_s)
        return {**accuracy(grades), "grades": grades} if return_grades else accuracy(grades)
