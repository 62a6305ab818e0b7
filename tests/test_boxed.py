import pytest

from lora_maml.boxed import final_boxes, is_placeholder, last_boxed


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


ECHO = "(Remember to put your final answer in \\boxed{}.)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The instruction echoed after the answer, on its own line or in the same sentence.
        ("The total is \\boxed{12}.\n" + ECHO, "12"),
        ("The total is $\\boxed{12}$. " + ECHO + " " + ECHO, "12"),
        (r"\boxed{12} and then \boxed{ }", "12"),
        (r"\boxed{12}, so the answer is \boxed{answer}", "12"),
        (r"\boxed{\frac{1}{2}} final: $\boxed{\text{Your final answer}}$", r"\frac{1}{2}"),
        (r"\boxed{7} \boxed{\ldots} \boxed{...}", "7"),
        # A real answer after the echo is still the answer.
        (ECHO + r" The answer is \boxed{5}.", "5"),
        # Only placeholders: present, but saying nothing (the last one's content).
        (ECHO, ""),
        (r"\boxed{answer}", "answer"),
    ],
)
def test_placeholder_boxes_never_override_a_real_answer(text, expected):
    assert last_boxed(text) == expected


def test_an_unclosed_box_is_never_skipped_for_an_earlier_one():
    # The generation was cut off while writing its answer; the earlier box was not final.
    assert last_boxed(r"\boxed{3} then \boxed{4") is None
    # An echo after an unclosed box: the echo is the last complete box, and says nothing.
    assert last_boxed(r"\boxed{3} then \boxed{4 " + ECHO) == ""


@pytest.mark.parametrize("content", ["", " ", "answer", "Answer", r"\text{answer}", r"\ldots", "..."])
def test_is_placeholder(content):
    assert is_placeholder(content)


@pytest.mark.parametrize("content", ["0", "a", r"\text{(A)}", "x", "answer = 5", r"\emptyset"])
def test_real_answers_are_not_placeholders(content):
    assert not is_placeholder(content)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The solutions are \boxed{2} and \boxed{7}.", ["2", "7"]),
        (r"$\boxed{2}$, $\boxed{7}$", ["2", "7"]),
        (r"$x = \boxed{2}$ or $x = \boxed{7}$", ["2", "7"]),
        (r"$x_1 = \boxed{-1},\quad x_{2} = \boxed{3}$ and $\boxed{4}$", ["-1", "3", "4"]),
        (r"\boxed{2} \text{ and } \boxed{7}", ["2", "7"]),
        # A sentence or a computation between two boxes separates two answers.
        (r"First guess $\boxed{3}$, but correcting: $\boxed{5}$", ["5"]),
        (r"\boxed{3}. Then $3 + 2 = \boxed{5}$", ["5"]),
        # A placeholder ends the run, and an echo after it is skipped.
        (r"\boxed{1}, \boxed{}, \boxed{2}", ["2"]),
        (r"\boxed{2} and \boxed{7}. " + ECHO, ["2", "7"]),
        ("no box", None),
    ],
)
def test_final_boxes(text, expected):
    assert final_boxes(text) == expected
