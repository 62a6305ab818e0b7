"""``math_accuracy``: MATH final-answer accuracy as an :mod:`evaluate` metric.

Load it offline from this file (no Hub access is involved):

    evaluate.load("<repo>/lora_maml/eval/metric/math_accuracy.py")
    # or: lora_maml.eval.grading.load_metric()

``evaluate`` copies this script into its modules cache before importing it, so everything is
imported from the installed ``lora_maml`` package rather than relative to this file.
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
Returns:
    accuracy (float): fraction judged correct by math-verify.
    strict_accuracy (float): fraction equal after notational normalisation.
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

    def _compute(self, predictions, references, timeout_s=DEFAULT_TIMEOUT_S):
        return accuracy(grade_batch(predictions, references, timeout_s=timeout_s))
