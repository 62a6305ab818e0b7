import pytest

from lora_maml.boxed import last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is $\boxed{42}$.", "42"),
        (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
        (r"$\boxed{\sqrt{x^{2}+1}}$ done", r"\sqrt{x^{2}+1}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}.", "3"),
        (r"\boxed{1} and then \fbox{7}", "7"),
        (r"\fbox{7} and then \boxed{8}", "8"),
        (r"$\fbox{x+1}$", "x+1"),
        (r"so $x^2 + y^2 = \boxed 9$.", "9"),
        (r"the answer is \boxed 12 and that is all", "12"),
        (r"\boxed{} is empty", ""),
        (r"a set: \boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"escaped closing brace \boxed{a\}b}", r"a\}b"),
        (r"\boxed {5}", "5"),
        (r"\boxed{5} then a space form \boxed 6", "6"),
        (r"\boxed 6 then a braced form \boxed{7}", "7"),
    ],
)
def test_last_boxed_finds_the_last_answer(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box here",
        "",
        r"\boxed{unbalanced",
        r"\boxed{\frac{1}{2}",
        r"\boxed{1} and a last one that never closes \boxed{2",
        r"\boxed",
        r"\boxed $",
        r"\boxedanswer{3}",
        r"\fbox 5",
    ],
)
def test_last_boxed_returns_none_without_a_usable_box(text):
    assert last_boxed(text) is None


def test_last_boxed_ignores_braces_after_the_box():
    assert last_boxed(r"\boxed{a}{b} \text{done}") == "a"
