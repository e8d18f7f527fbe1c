"""The README's code example runs as printed, on a distilled set written by distill.py."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```\s*<!-- readme-example:end -->", text, re.S)
    assert block, "README lost its marked example"
    lines = block.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return "\n".join(line[indent:] for line in lines)


def test_readme_example_trains_a_model_on_a_distilled_set(run4):
    code = readme_example()
    assert '"outputs/demo/distill/seed0/distilled_best.pt"' in code
    code = code.replace('"outputs/demo/distill/seed0/distilled_best.pt"', repr(str(run4 / "distilled_last.pt")))
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README example", "exec"), scope)
    model, s = scope["model"], scope["s"]
    assert scope["epoch"] == 49 and torch.isfinite(scope["loss"])
    with torch.no_grad():  # it learned the set: each synthetic image retrieves its own text
        image_features, text_features = model.eval()(s["image_syn"], s["text_syn"])
        logits = torch.nn.functional.normalize(image_features, dim=1) @ torch.nn.functional.normalize(text_features, dim=1).T
    assert (logits.argmax(dim=1) == torch.arange(len(logits))).float().mean() >= 0.75
