"""The README's examples run as written: the tuned validation loss improves, and the vmap example
gives one hypergradient per λ."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run_and_improve():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    scope = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), scope)
    assert float(scope["tuned"].best_value) < float(scope["res"].value)
    sols = scope["sols"]
    assert sols.value.shape == (3,) and sols.grad["log_l2"].shape == (3, 2) and not sols.diverged.any()
