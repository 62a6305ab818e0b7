"""Data: MATH sources, the embedded synthetic suite, prepared splits, tokenisation, episodes."""

# The 7 MATH subjects are the meta-learning tasks; this order is the canonical one everywhere.
SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
